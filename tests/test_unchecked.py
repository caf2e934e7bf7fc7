"""The unchecked fast path: with value checks off, bad metadata and values never crash or leak an id.

Value checks read device values (a host sync), so an engine runs without them
(the default on CUDA; here forced with set_value_checks(False), the same path
on every device). Whatever the inputs, on every backend:

- no exception and no out-of-bounds access (the reference raises on an
  out-of-bounds index; the interpreted Triton kernels would raise on a bad
  pointer; CUDA runs under compute-sanitizer in the GPU proof run);
- every emitted id is in [0, V), or -1 as padding after the emitted token;
- the documented results: a draft id outside [0, V) is never accepted,
  num_accepted stays in [0, γ], an inactive request emits nothing, and
  markov_draft's anchor outside [0, V) is clamped.
"""

from __future__ import annotations

import math

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import markov_draft as md_op
from dspark_kernels.ops import rejection_sample as rs_op

from support import DEVICE, available_backends, to_device

RS_BACKENDS = available_backends(rs_op)
MD_BACKENDS = available_backends(md_op)
CASES = 24


@pytest.fixture(autouse=True)
def _checks_off():
    dk.set_value_checks(False)
    yield
    dk.set_value_checks(None)


def _nasty(g, shape, scale=3.0):
    """Random floats with NaN, +-inf and huge values sprinkled in."""
    x = torch.randn(shape, generator=g) * scale
    pick = torch.rand(shape, generator=g)
    x = torch.where(pick < 0.03, torch.full_like(x, math.nan), x)
    x = torch.where((pick >= 0.03) & (pick < 0.06), torch.full_like(x, math.inf), x)
    x = torch.where((pick >= 0.06) & (pick < 0.12), torch.full_like(x, -math.inf), x)
    return torch.where((pick >= 0.12) & (pick < 0.14), torch.full_like(x, 3e38), x)


def _bad_ints(g, shape, lo, hi):
    """Integers mostly in [lo, hi) with -1, hi, huge and very negative values mixed in."""
    x = torch.randint(lo, max(hi, lo + 1), shape, generator=g)
    pick = torch.rand(shape, generator=g)
    specials = torch.tensor([-1, hi, 2**31 - 1, -(2**31), hi + 7, -5])
    idx = torch.randint(0, len(specials), shape, generator=g)
    return torch.where(pick < 0.3, specials[idx], x)


def rejection_case(i: int) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(1000 + i)
    R, gamma, V = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g)), \
        int(torch.randint(1, 40, (1,), generator=g))
    T = int(torch.randint(0, R * (gamma + 1) + 3, (1,), generator=g))
    lengths = _bad_ints(g, (R,), 0, gamma + 1).to(torch.int32)
    if i % 3 == 0:  # consistent offsets with bad lengths beside them
        cu = torch.zeros(R + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths.clamp(0, gamma) + 1, 0)
    else:  # anything: negative, decreasing, past T
        cu = _bad_ints(g, (R + 1,), 0, T + 1).to(torch.int32)
    x = dict(target_logits=_nasty(g, (T, V)), draft_tokens=_bad_ints(g, (R, gamma), 0, V).to(torch.int32),
             draft_probs=None, lengths=lengths, cu_verify=cu,
             temperature=torch.where(torch.rand(R, generator=g) < 0.3, torch.tensor(math.nan),
                                     torch.rand(R, generator=g) * 2 - 0.5),
             seed=torch.randint(0, 2**62, (R,), generator=g), offset=torch.tensor(i, dtype=torch.int64))
    if i % 2:
        x["top_k"] = _bad_ints(g, (R,), -2, V + 3).to(torch.int32)
    if i % 4 in (1, 2):
        x["top_p"] = _nasty(g, (R,), 0.7)
    mode = i % 3
    if mode == 1:
        x["draft_probs"] = _nasty(g, (R, gamma, V)).abs()  # unnormalised, NaN, inf
    elif mode == 2:
        x["draft_logits"] = _nasty(g, (R, gamma, V))
        if i % 2:
            x["draft_token_probs"] = _nasty(g, (R, gamma), 0.5)
        if i % 5 == 0:
            x["draft_temperature"] = _nasty(g, (R,), 1.0)
    return x, V


@pytest.mark.parametrize("backend", RS_BACKENDS)
@pytest.mark.parametrize("i", range(CASES))
def test_rejection_sample_never_leaks(backend, i):
    x, V = rejection_case(i)
    args = {k: to_device(v) for k, v in x.items()}
    tokens, n_acc = dk.rejection_sample(**args, backend=backend)
    tokens, n_acc = tokens.cpu().long(), n_acc.cpu().long()
    R, gamma = x["draft_tokens"].shape
    assert tokens.shape == (R, gamma + 1) and n_acc.shape == (R,)
    assert bool(((tokens >= -1) & (tokens < V)).all()), tokens
    assert bool(((n_acc >= 0) & (n_acc <= gamma)).all()), n_acc
    pos = torch.arange(gamma + 1)
    drafts = x["draft_tokens"].long()
    for r in range(R):
        k = int(n_acc[r])
        # Accepted drafts are the drafts, valid ids; then one token or nothing; then padding.
        assert torch.equal(tokens[r, :k], drafts[r, :k]), (r, tokens[r], drafts[r])
        assert bool(((drafts[r, :k] >= 0) & (drafts[r, :k] < V)).all())
        assert bool((tokens[r, k + 1:] == -1).all())
    cu = x["cu_verify"].long()
    T = x["target_logits"].shape[0]
    inactive = ~((cu[1:] - cu[:-1] > 0) & (cu[:-1] >= 0) & (cu[:-1] < T))
    assert bool((tokens[inactive] == -1).all()) and bool((n_acc[inactive] == 0).all())
    assert bool((tokens[~inactive, 0] >= 0).all())  # a live request always emits a token
    del pos


def markov_case(i: int) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(2000 + i)
    R, gamma, V, r, d = 3, 2, int(torch.randint(1, 30, (1,), generator=g)), 4, 3
    x = dict(base_logits=_nasty(g, (R, gamma, V)), anchor=_bad_ints(g, (R,), 0, V),
             w1=_nasty(g, (V, r), 0.5), w2=_nasty(g, (V, r), 0.5),
             temperature=torch.where(torch.rand(R, generator=g) < 0.3, torch.tensor(math.nan),
                                     torch.rand(R, generator=g) * 2 - 0.5),
             seed=torch.randint(0, 2**62, (R,), generator=g), offset=torch.tensor(i, dtype=torch.int64),
             return_draft_probs=bool(i % 2), return_draft_logits=bool(i % 3 == 0))
    if i % 2:
        x.update(hidden=_nasty(g, (R, gamma, d)), conf_weight=_nasty(g, (d + r,)),
                 sts_temperature=_nasty(g, (gamma,), 1.0))
        if i % 4 == 1:
            x.update(gate_weight=_nasty(g, (r, d + r)), gate_bias=_nasty(g, (r,)))
    elif i % 4 == 2:
        x.update(hidden=_nasty(g, (R, gamma, d)), rnn_weight=_nasty(g, (3 * r, 2 * r + d)), rnn_bias=_nasty(g, (3 * r,)))
    return x, V


@pytest.mark.parametrize("backend", MD_BACKENDS)
@pytest.mark.parametrize("i", range(CASES // 2))
def test_markov_draft_never_leaks(backend, i):
    x, V = markov_case(i)
    out = dk.markov_draft(**{k: to_device(v) for k, v in x.items()}, backend=backend)
    tokens = out.tokens.cpu().long()
    assert tokens.shape == x["base_logits"].shape[:2]
    assert bool(((tokens >= 0) & (tokens < V)).all()), tokens


@pytest.mark.parametrize("backend", RS_BACKENDS)
def test_invalid_draft_is_rejected_and_the_target_samples(backend):
    """Drafts [[1, 99, -1]] with lengths [3] (issue 12): 1 is accepted when the target is sure of it, 99
    (>= V) is rejected, and the emitted token comes from the target row, never 99 or -1."""
    V, R = 8, 16
    logits = torch.full((4, V), -20.0)
    logits[0, 1] = 20.0  # the target is sure of draft 1
    logits[1, 5] = 20.0  # ... and of token 5 after it
    drafts = torch.tensor([[1, 99, -1]] * R, dtype=torch.int32)
    x = dict(target_logits=logits.repeat(R, 1), draft_tokens=drafts, draft_probs=None,
             lengths=torch.full((R,), 3, dtype=torch.int32), cu_verify=torch.arange(R + 1, dtype=torch.int32) * 4,
             temperature=torch.ones(R), seed=torch.arange(R, dtype=torch.int64), offset=torch.tensor(0))
    tokens, n_acc = dk.rejection_sample(**{k: to_device(v) for k, v in x.items()}, backend=backend)
    assert n_acc.cpu().tolist() == [1] * R
    assert tokens.cpu().tolist() == [[1, 5, -1, -1]] * R


def test_fuzz_cases_are_bad_enough():
    """The generator really produces the inputs the test claims to survive."""
    bad_ids = bad_cu = nan_t = 0
    for i in range(CASES):
        x, V = rejection_case(i)
        d = x["draft_tokens"]
        bad_ids += int(((d < 0) | (d >= V)).any())
        cu = x["cu_verify"].long()
        bad_cu += int(bool((cu[1:] < cu[:-1]).any() or (cu < 0).any() or (cu > x["target_logits"].shape[0]).any()))
        nan_t += int(torch.isnan(x["temperature"]).any())
    assert bad_ids >= CASES // 2 and bad_cu >= CASES // 3 and nan_t >= CASES // 4
