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


# ---------------------------------------------------------------------------
# The verify batch: pack_verify, append_verify_kv, verify_attention with bad metadata
# ---------------------------------------------------------------------------

from dspark_kernels.ops import append_verify_kv as av_op  # noqa: E402
from dspark_kernels.ops import pack_verify as pv_op  # noqa: E402
from dspark_kernels.ops import verify_attention as va_op  # noqa: E402

PV_BACKENDS = available_backends(pv_op)
AV_BACKENDS = available_backends(av_op)
VA_BACKENDS = available_backends(va_op)
INT32_MAX = 2**31 - 1


def _rand(g, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=g))


def pack_case(i: int) -> dict:
    """Random pack_verify inputs whose metadata is mostly wrong: lengths outside [0, γ], cu_verify
    negative / decreasing / past the bucket, start positions negative or past int32, page ids negative
    or huge, page columns past the table, a bucket smaller than cu_verify[R]."""
    g = torch.Generator().manual_seed(4000 + i)
    R, gamma = _rand(g, 0, 5), _rand(g, 0, 4)
    rows = _rand(g, 0, R * (gamma + 1) + 5)
    lengths = _bad_ints(g, (R,), 0, gamma + 1).to(torch.int32)
    if i % 3 == 0:  # offsets consistent with (bad) lengths, in a bucket too small for them
        cu = torch.zeros(R + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lengths.long().clamp(-3, gamma + 3) + 1, 0)
        rows = max(0, int(cu[-1]) - 2)
    else:
        cu = _bad_ints(g, (R + 1,), 0, rows + 1)
    start = _bad_ints(g, (R,), 0, 40)
    if i % 4 == 1 and R:
        start[0] = 2**40
    x = dict(anchor=_bad_ints(g, (R,), 0, 1000), tokens=_bad_ints(g, (R, gamma), 0, 1000), lengths=lengths,
             cu_verify=cu.to(torch.int32 if i % 2 else torch.int64), start_pos=start, num_rows=rows,
             pad_token=_rand(g, 0, 1000))
    if i % 5 != 4:
        page_size, width = _rand(g, 1, 6), _rand(g, 0, 4)
        num_pages = _rand(g, 1, 7) if i % 3 else None
        x.update(page_table=_bad_ints(g, (R, width), 0, num_pages or 7).to(torch.int32 if i % 2 else torch.int64),
                 page_size=page_size, num_pages=num_pages,
                 scratch_slot=_rand(g, 0, (num_pages or 7) * page_size))
    return x


@pytest.mark.parametrize("i", range(CASES))
def test_pack_verify_never_leaks(i):
    """Every backend: the documented unchecked results (positions in [0, 2^31), owners in [-1, R), live
    tokens from their own request, padding rows exactly (pad_token, 0, -1, scratch_slot), slots inside the
    cache or the scratch slot), and the same outputs on every backend (clamps are the definition)."""
    x = pack_case(i)
    outs = [dk.pack_verify(**{k: to_device(v) for k, v in x.items()}, backend=b) for b in PV_BACKENDS]
    R, gamma = x["tokens"].shape
    rows = x["num_rows"]
    for out in outs:
        tok, pos, req, slot = (t.cpu().long() for t in out)
        assert tok.shape == pos.shape == req.shape == (rows,)
        assert bool(((pos >= 0) & (pos <= INT32_MAX)).all()) and bool(((req >= -1) & (req < R)).all())
        pad = req < 0
        assert bool((tok[pad] == x["pad_token"]).all()) and bool((pos[pad] == 0).all())
        ids = torch.cat([x["anchor"][:, None], x["tokens"]], 1).to(torch.int32).long()
        for t in (~pad).nonzero()[:, 0].tolist():
            assert int(tok[t]) in ids[int(req[t])].tolist(), (t, tok[t], ids[int(req[t])])
        if "page_table" not in x:
            assert slot.shape == (0,)
            continue
        assert slot.shape == (rows,)
        assert bool((slot[pad] == x["scratch_slot"]).all())
        bound = (x["num_pages"] or 2**31) * x["page_size"]
        assert bool(((slot == x["scratch_slot"]) | ((slot >= 0) & (slot < bound))).all()), slot
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("backend", AV_BACKENDS)
@pytest.mark.parametrize("i", range(CASES // 2))
def test_append_verify_kv_never_leaks(backend, i):
    """Slots -1, P·S, huge and very negative among good ones (duplicates too): a cell no valid slot names
    keeps its value; a cell some row names holds one of those rows' key / value."""
    g = torch.Generator().manual_seed(5000 + i)
    T, P, S, H, D = _rand(g, 0, 9), _rand(g, 0, 4), _rand(g, 1, 6), _rand(g, 1, 4), _rand(g, 1, 20)
    key, value = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    k_cache, v_cache = torch.randn(P, S, H, D, generator=g), torch.randn(P, S, H, D, generator=g)
    slots = _bad_ints(g, (T,), 0, P * S)
    k, v = to_device(k_cache.clone()), to_device(v_cache.clone())
    dk.append_verify_kv(to_device(key), to_device(value), k, v, to_device(slots), backend=backend)
    k, v = k.cpu(), v.cpu()
    writers: dict[int, list[int]] = {}
    for t, s in enumerate(slots.tolist()):
        if 0 <= s < P * S:
            writers.setdefault(s, []).append(t)
    for s in range(P * S):
        cell = (s // S, s % S)
        if s not in writers:
            assert torch.equal(k[cell], k_cache[cell]) and torch.equal(v[cell], v_cache[cell]), s
        else:
            assert any(torch.equal(k[cell], key[t]) for t in writers[s]), s
            assert any(torch.equal(v[cell], value[t]) for t in writers[s]), s


def attention_case(i: int) -> dict:
    """Random verify_attention inputs with bad metadata: page ids outside the cache (or an empty cache),
    kv_lens negative or past the page table, cu_verify negative / decreasing / past q's rows, garbage
    tree-mask words; finite q, k and v."""
    g = torch.Generator().manual_seed(6000 + i)
    R, T, hkv, group = _rand(g, 1, 4), _rand(g, 0, 10), _rand(g, 1, 3), _rand(g, 1, 3)
    D, S, P, M = (5, 8, 16)[i % 3], _rand(g, 1, 5), (0 if i % 7 == 3 else _rand(g, 1, 6)), _rand(g, 0, 4)
    cu = _bad_ints(g, (R + 1,), 0, T + 1)
    if i % 4 == 0:
        cu = torch.sort(cu.clamp(0, T)).values  # a valid cu_verify next to bad pages and lengths
    x = dict(q=torch.randn(T, hkv * group, D, generator=g), k_cache=torch.randn(P, S, hkv, D, generator=g),
             v_cache=torch.randn(P, S, hkv, D, generator=g),
             page_table=_bad_ints(g, (R, M), 0, P).to(torch.int32),
             kv_lens=_bad_ints(g, (R,), 0, M * S + 1).to(torch.int32),
             cu_verify=cu.to(torch.int32), window=(-1, 3, 1, -1, 6)[i % 5], softcap=(0.0, 2.0)[i % 2],
             return_lse=True)
    if i % 3 == 1:
        x["tree_mask"] = torch.randint(-(2**31), 2**31 - 1, (T, 1 + i % 2), generator=g, dtype=torch.int32)
    return x


def _covered(x) -> tuple[torch.Tensor, bool]:
    """Rows some request's clamped range [clamp(cu[r], 0, T), clamp(cu[r+1], that, T)) covers, and
    whether two ranges overlap."""
    T = x["q"].shape[0]
    cu = x["cu_verify"].tolist()
    hits = torch.zeros(T, dtype=torch.int64)
    for r in range(len(cu) - 1):
        a = min(max(cu[r], 0), T)
        hits[a:min(max(cu[r + 1], a), T)] += 1
    return hits > 0, bool((hits > 1).any())


@pytest.mark.parametrize("i", range(CASES))
def test_verify_attention_never_reads_out_of_bounds(i):
    """Every backend survives the bad metadata (the Triton interpreter segfaulted on each kind before
    the kernel clamped it); rows some request covers are finite; where the clamped row ranges do not
    overlap, the backends agree on them (the clamps are one definition)."""
    x = attention_case(i)
    T, hq, D = x["q"].shape
    covered, overlap = _covered(x)
    results = {}
    for backend in VA_BACKENDS:
        out, lse = dk.verify_attention(**{k: to_device(v) for k, v in x.items()}, backend=backend)
        out, lse = out.cpu(), lse.cpu()
        assert out.shape == (T, hq, D) and lse.shape == (T, hq) and lse.dtype == torch.float32
        assert bool(torch.isfinite(out[covered]).all()) and not bool(lse[covered].isnan().any())
        results[backend] = (out, lse)
    ref_out, ref_lse = results["reference"]
    for backend, (out, lse) in results.items():
        if not overlap:
            assert torch.allclose(out[covered], ref_out[covered], atol=1e-5, rtol=1e-5), backend
            assert torch.equal(lse[covered] == float("-inf"), ref_lse[covered] == float("-inf")), backend
            fin = torch.isfinite(ref_lse[covered])
            assert torch.allclose(lse[covered][fin], ref_lse[covered][fin], atol=1e-5, rtol=1e-5), backend


def test_verify_batch_fuzz_cases_are_bad_enough():
    """The generators really produce the inputs the tests claim to survive."""
    bad_pages = bad_lens = bad_cu = 0
    for i in range(CASES):
        x = attention_case(i)
        P, S, M = x["k_cache"].shape[0], x["k_cache"].shape[1], x["page_table"].shape[1]
        pt = x["page_table"]
        bad_pages += int(bool(((pt < 0) | (pt >= P)).any()))
        bad_lens += int(bool(((x["kv_lens"] < 0) | (x["kv_lens"] > M * S)).any()))
        cu = x["cu_verify"].long()
        bad_cu += int(bool((cu[1:] < cu[:-1]).any() or (cu < 0).any() or (cu > x["q"].shape[0]).any()))
    assert bad_pages >= CASES // 2 and bad_lens >= CASES // 3 and bad_cu >= CASES // 3
    short_bucket = bad_start = 0
    for i in range(CASES):
        x = pack_case(i)
        cu = x["cu_verify"].long()
        short_bucket += int(bool(cu.numel() > 1 and int(cu[-1]) > x["num_rows"]))
        bad_start += int(bool(((x["start_pos"] < 0) | (x["start_pos"] > INT32_MAX - 8)).any()))
    assert short_bucket >= CASES // 4 and bad_start >= CASES // 4


# --- schedule_verify / verify_capacity: NaN, ±inf, values outside [0, 1], any capacity ---

def schedule_case(i: int) -> dict:
    g = torch.Generator().manual_seed(7000 + i)
    R, G = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    surv = _nasty(g, (R, G), scale=0.7)
    hist = _nasty(g, (R, G), scale=0.7)
    sps = _nasty(g, (R * (G + 1) + 1,), scale=1.0)
    return dict(survival=surv, sps=sps, history=hist, max_len=_bad_ints(g, (R,), 0, G + 1),
                active=torch.rand(R, generator=g) < 0.7,
                capacity=torch.tensor(int(_bad_ints(g, (1,), 0, R * G + 1)[0]), dtype=torch.int64))


@pytest.mark.parametrize("i", range(CASES))
def test_scheduler_never_leaks(i):
    """Lengths stay in [0, clamp(max_len, 0, γ)], NaN / non-positive values are never admitted, async
    fits A + clamp(K, 0, .) rows, and every backend agrees with the reference."""
    from dspark_kernels.ops import verify_capacity as vc_op

    x = schedule_case(i)
    R, G = x["survival"].shape
    caps = x["max_len"].long().clamp(0, G)
    slots = x["active"][:, None] & (torch.arange(G)[None, :] < caps[:, None])
    positive = slots & (x["survival"].float() > 0)
    for mode, extra in (("causal", {}), ("async", {"history": x["history"]}), ("async", {"capacity": x["capacity"]})):
        want = None
        for backend in available_backends(vc_op):
            kw = {k: to_device(v) for k, v in dict(max_len=x["max_len"], active=x["active"], **extra).items()}
            s = dk.Schedule(*(t.cpu() for t in dk.schedule_verify(to_device(x["survival"]), to_device(x["sps"]),
                                                                  mode=mode, backend=backend, **kw)))
            assert bool((s.lengths >= 0).all()) and bool((s.lengths.long() <= caps).all())
            assert bool((s.lengths.long() <= positive.sum(1)).all())
            assert int(s.total) == int(s.cu_verify[-1]) == int(x["active"].sum()) + int(s.lengths.sum())
            if "capacity" in extra:
                assert int(s.lengths.sum()) <= max(int(x["capacity"]), 0)
            got = (s.lengths.tolist(), s.cu_verify.tolist(), int(s.total))
            want = want or got
            assert got == want, (mode, backend)
    ks = {b: int(dk.verify_capacity(to_device(x["history"]), to_device(x["sps"]), max_len=to_device(x["max_len"]),
                                    active=to_device(x["active"]), backend=b)) for b in available_backends(vc_op)}
    n_hist = int((slots & (x["history"].float() > 0)).sum())
    assert len(set(ks.values())) == 1 and 0 <= ks["reference"] <= n_hist, ks


# ---------------------------------------------------------------------------
# tree_rejection_sample with bad metadata and values
# ---------------------------------------------------------------------------

from dspark_kernels.ops import tree_rejection_sample as trs_op  # noqa: E402

TRS_BACKENDS = available_backends(trs_op)


def tree_case(i: int) -> tuple[dict, int]:
    """Random tree_rejection_sample inputs: parents -1 / earlier (good), own index or later, < -1, huge; node
    ids outside [0, V); num_nodes outside [0, N]; cu_verify consistent or anything; NaN / inf everywhere."""
    g = torch.Generator().manual_seed(5000 + i)
    R, N, V = _rand(g, 1, 6), _rand(g, 0, 7), _rand(g, 1, 40)
    T = _rand(g, 0, R * (N + 1) + 3)
    num_nodes = _bad_ints(g, (R,), 0, N + 1).to(torch.int32)
    if i % 3 == 0:
        cu = torch.zeros(R + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(num_nodes.clamp(0, N) + 1, 0)
    else:
        cu = _bad_ints(g, (R + 1,), 0, T + 1).to(torch.int32)
    idx = torch.arange(N)
    good = (torch.rand(R, N, generator=g) * (idx + 1)).long() - 1  # in [-1, i - 1]
    parents = torch.where(torch.rand(R, N, generator=g) < 0.7, good, _bad_ints(g, (R, N), -1, N + 1))
    x = dict(target_logits=_nasty(g, (T, V)), tree_tokens=_bad_ints(g, (R, N), 0, V).to(torch.int32),
             tree_parents=parents.to(torch.int32), num_nodes=num_nodes, cu_verify=cu,
             temperature=torch.where(torch.rand(R, generator=g) < 0.3, torch.tensor(math.nan),
                                     torch.rand(R, generator=g) * 2 - 0.5),
             seed=torch.randint(0, 2**62, (R,), generator=g), offset=torch.tensor(i, dtype=torch.int64))
    if i % 2:
        x["draft_probs"] = _nasty(g, (R, N, V)).abs()  # unnormalised, NaN, inf, unequal siblings
    if i % 4 in (1, 2):
        x["top_k"] = _bad_ints(g, (R,), -2, V + 3).to(torch.int32)
    if i % 4 in (2, 3):
        x["top_p"] = _nasty(g, (R,), 0.7)
    return x, V


@pytest.mark.parametrize("backend", TRS_BACKENDS)
@pytest.mark.parametrize("i", range(CASES))
def test_tree_rejection_sample_never_leaks(backend, i):
    """Ids in [0, V) or -1; the accepted nodes are a root path of nodes < N with valid ids; an inactive
    request emits nothing; a live one emits exactly one token after its path."""
    x, V = tree_case(i)
    out = dk.tree_rejection_sample(**{k: to_device(v) for k, v in x.items()}, backend=backend)
    tokens, n_acc, nodes = (t.cpu().long() for t in out)
    R, N = x["tree_tokens"].shape
    assert tokens.shape == (R, N + 1) and nodes.shape == (R, N)
    assert bool(((tokens >= -1) & (tokens < V)).all()), tokens
    assert bool(((n_acc >= 0) & (n_acc <= N)).all())
    cu = x["cu_verify"].long()
    T = x["target_logits"].shape[0]
    live = (cu[1:] - cu[:-1] > 0) & (cu[:-1] >= 0) & (cu[:-1] < T)
    for r in range(R):
        k = int(n_acc[r])
        path = nodes[r, :k].tolist()
        parent = -1
        for c in path:
            assert 0 <= c < N and int(x["tree_parents"][r, c]) == parent and c > parent
            assert 0 <= int(x["tree_tokens"][r, c]) < V
            parent = c
        assert tokens[r, :k].tolist() == [int(x["tree_tokens"][r, c]) for c in path]
        assert bool((nodes[r, k:] == -1).all()) and bool((tokens[r, k + 1:] == -1).all())
        assert (int(tokens[r, k]) >= 0) == bool(live[r]), (r, tokens[r])


def test_tree_fuzz_cases_are_bad_enough():
    bad_parent = bad_ids = bad_n = 0
    for i in range(CASES):
        x, V = tree_case(i)
        par, idx = x["tree_parents"].long(), torch.arange(x["tree_parents"].shape[1])
        bad_parent += int(((par < -1) | (par >= idx)).any())
        bad_ids += int(((x["tree_tokens"] < 0) | (x["tree_tokens"] >= V)).any())
        bad_n += int(((x["num_nodes"] < 0) | (x["num_nodes"] > x["tree_tokens"].shape[1])).any())
    assert bad_parent >= CASES // 2 and bad_ids >= CASES // 2 and bad_n >= CASES // 3


# ---------------------------------------------------------------------------
# tree_verify_layout with bad metadata
# ---------------------------------------------------------------------------

from dspark_kernels.ops import tree_verify_layout as tvl_op  # noqa: E402
from dspark_kernels.reference.verify_attention import tree_bits  # noqa: E402


def layout_case(i: int) -> dict:
    g = torch.Generator().manual_seed(6000 + i)
    R, N = _rand(g, 1, 6), _rand(g, 0, 64)
    x = dict(tree_parents=_bad_ints(g, (R, N), -1, N + 1).to(torch.int32),
             num_nodes=_bad_ints(g, (R,), 0, N + 1).to(torch.int32),
             start_pos=_bad_ints(g, (R,), 0, 2**31 - 1).to(torch.int32), num_rows=_rand(g, 0, R * (N + 1) + 5))
    if i % 2:
        x["cu_verify"] = _bad_ints(g, (R + 1,), 0, x["num_rows"] + 1).to(torch.int32)
    return x


@pytest.mark.parametrize("backend", available_backends(tvl_op))
@pytest.mark.parametrize("i", range(CASES))
def test_tree_verify_layout_never_leaks(backend, i):
    """Every row is a well-formed tree row (bit j set for its local index j, none above), positions in
    [0, 2^31), and every backend agrees with the reference."""
    x = layout_case(i)
    out = [t.cpu() for t in dk.tree_verify_layout(**{k: to_device(v) for k, v in x.items()}, backend=backend)]
    ref = dk.tree_verify_layout(**x, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(out, ref)), i
    mask, pos, _ = out
    N = x["tree_parents"].shape[1]
    if not mask.shape[0]:
        return
    bits = tree_bits(mask, 32 * mask.shape[1])
    assert bool(bits[:, 0].all()) and bool((pos >= 0).all())
    top = (bits.long() * torch.arange(bits.shape[1])).amax(1)  # highest set bit of each row
    assert bool((top <= N).all())
    assert bool(bits.gather(1, top[:, None]).all())


# ---------------------------------------------------------------------------
# compact_accepted_kv with bad metadata
# ---------------------------------------------------------------------------

from dspark_kernels.ops import compact_accepted_kv as cak_op  # noqa: E402


def compact_case(i: int) -> dict:
    """Mostly real root paths (skipping a node now and then) on mostly valid pages, with bad entries mixed in:
    nodes past N or out of order, negative or huge page ids, start positions past the table."""
    g = torch.Generator().manual_seed(7000 + i)
    R, N, P, S = _rand(g, 1, 5), _rand(g, 1, 9), _rand(g, 2, 9), _rand(g, 1, 6)
    M = (N + 2 * S) // S + _rand(g, 0, 2)
    steps = 1 + (torch.rand(R, N, generator=g) < 0.3).long()
    nodes = torch.cumsum(steps, 1) - 1
    nodes = torch.where(torch.rand(R, N, generator=g) < 0.05, _bad_ints(g, (R, N), 0, N), nodes)
    start = torch.where(torch.rand(R, generator=g) < 0.8, torch.randint(0, S, (R,), generator=g),
                        _bad_ints(g, (R,), 0, M * S))
    return dict(k_cache=torch.randn(P, S, 2, 3, generator=g), v_cache=torch.randn(P, S, 2, 3, generator=g),
                page_table=torch.where(torch.rand(R, M, generator=g) < 0.9, torch.randint(0, P, (R, M), generator=g),
                                       _bad_ints(g, (R, M), 0, P)).to(torch.int32),
                start_pos=start.to(torch.int32), accepted_nodes=nodes.to(torch.int32),
                num_accepted=_bad_ints(g, (R,), 0, N + 1).to(torch.int32))


@pytest.mark.parametrize("backend", available_backends(cak_op))
@pytest.mark.parametrize("i", range(CASES))
def test_compact_accepted_kv_never_leaks(backend, i):
    """No out-of-bounds access (the interpreter and the reference would raise), and every backend writes the
    reference's cache: bad paths move nothing, moves onto or from slots outside the table are skipped."""
    x = compact_case(i)
    want = {k: v.clone() for k, v in x.items()}
    dk.compact_accepted_kv(**want, backend="reference")
    got = {k: to_device(v.clone()) for k, v in x.items()}
    dk.compact_accepted_kv(**got, backend=backend)
    assert torch.equal(got["k_cache"].cpu(), want["k_cache"]) and torch.equal(got["v_cache"].cpu(), want["v_cache"])


def test_compact_fuzz_cases_move_something():
    moved = 0
    for i in range(CASES):
        x = compact_case(i)
        before = x["k_cache"].clone()
        dk.compact_accepted_kv(**x, backend="reference")
        moved += not torch.equal(before, x["k_cache"])
    assert moved >= CASES // 4
