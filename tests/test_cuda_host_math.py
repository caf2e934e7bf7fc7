"""The CUDA kernels' per-element math, run on the host against the reference ops.

csrc/sampling.cuh holds every formula the CUDA kernels of rejection_sample
and markov_draft use (z = logit · (1/T) with the reciprocal rounded once per
row, ordered float keys, the two top-k bisections for the k-th token in the
order (z descending, id ascending) and the tie tally between them, the top-p
bisection, the target probability, draft validity and the acceptance test,
the residual's q of every draft mode, Gumbel noise and race scores, the
softmax partial merge, the row -> request lookup, the workspace layout) as
__host__ __device__ functions, and csrc/philox.cuh the counter-based RNG.
This test compiles csrc/tests/host_math_sampling.cu with nvcc, a host
program that includes both headers and runs a *sequential* emulation of the
kernels' algorithms with those same functions (row statistics of every
target row, then each request's chain walk and final residual/bonus Gumbel
race over the vocabulary; for markov_draft the fp32 FMA product
z = U + e·W2ᵀ, the per-tile race/softmax partials and their merge), then
compares with the reference ops (called directly, without the op's input
validation, so that unchecked-path inputs can be fed too):

- the filtered target distribution of single rows (kernel 1 + target_prob)
  against reference.sampling.filtered_probs: exact support and close values,
  on tie-heavy rows (ties at the k-th value, signed zeros), top_k = 1, top-k
  off (k <= 0, k >= V), and top_p = 1 rows in a top_p batch (z2 exactly 1);
- rejection_sample tokens on a few hundred random small requests: every draft
  mode, the byte-minimal q = p_d(x)·exp(u - u_x) with p_d(x) not equal to
  softmax(u)(x), invalid draft ids (-1 and >= V), greedy target and draft
  rows, inactive requests, lengths larger than the request's rows or the
  target rows (the unchecked-path clamps);
- markov_draft tokens and p_d(x_k), including out-of-range anchors.

What this checks: the math, stream ids, positions and indices, tie-breaks and
clamping the kernels use. What it does NOT check: the kernels' parallel
parts (block/warp reductions, shared-memory tiling, thread-to-index mapping,
launch configuration); those run only on a GPU (tests comparing the cuda
backend with the reference do that where a GPU exists).
"""

import os
import shutil
import subprocess

import pytest
import torch

from dspark_kernels.ops import markov_draft as markov_draft_op
from dspark_kernels.ops import rejection_sample as rejection_sample_op
from dspark_kernels.reference.sampling import filtered_probs, inverse_temperature

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def build_host_program(out_dir, name: str) -> str:
    """Compile the host program csrc/tests/<name>.cu against the csrc/ headers with
    nvcc into out_dir; return the executable. The one builder of every host
    program (tests/test_philox_uniform.py uses it too)."""
    src = os.path.join(CSRC, "tests", f"{name}.cu")
    exe = os.path.join(str(out_dir), name)
    res = subprocess.run(
        ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-I", CSRC, src, "-o", exe],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return exe


@pytest.fixture(scope="module")
def host_exe(tmp_path_factory):
    return build_host_program(tmp_path_factory.mktemp("host_math"), "host_math_sampling")


def _reference(op, *args):
    """The op's reference implementation on its leading positional arguments (the rest: their table
    defaults), without the op's checks."""
    return op.OP.run("reference", op.OP.Args(*args, *(a.default for a in op.OP.args[len(args):])))


def _fmt(t: torch.Tensor) -> str:
    # repr of an fp32 value as a Python float round-trips exactly through scanf("%f").
    return " ".join(repr(float(v)) if t.is_floating_point() else str(int(v)) for v in t.reshape(-1).tolist())


def _run(exe: str, chunks: list[str]) -> list[str]:
    res = subprocess.run([exe], input="\n".join(chunks) + "\n", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_scaled_logit_is_the_reference_product(host_exe):
    """z = logit · (1/T), 1/T rounded once per row (T = 1 on greedy rows), bit for bit the reference's."""
    g = torch.Generator().manual_seed(5)
    n = 20000
    t = torch.cat([torch.rand(n, generator=g) * 2, torch.rand(n, generator=g) * 1e-4, torch.tensor([0.0, 1.0, 3.0])])
    x = torch.randn(t.shape[0], generator=g) * 10
    lines = _run(host_exe, [" ".join(["SL", str(t.shape[0]), _fmt(t), _fmt(x)])])
    host = torch.tensor([int(v) for v in lines[0].split()], dtype=torch.int32)
    greedy, inv_t = inverse_temperature(t)
    want = x * inv_t
    assert torch.equal(host, want.view(torch.int32))
    # The product differs from the old division logit / T on a good share of the elements.
    divided = x / torch.where(greedy, torch.ones_like(t), t)
    assert (divided.view(torch.int32) != host).sum() > 1000


def _tie_heavy_logits(g: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    """Logits on a coarse grid: many exact ties in z (at the k-th value too) and signed zeros (-0.0)."""
    step = [1.0, 0.5, 0.25][int(torch.randint(0, 3, (1,), generator=g))]
    return (torch.randn(n, vocab, generator=g) * 1.5 / step).round() * step


def _top_k(g: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    """top_k per row: off (<= 0, >= V), 1 (the greedy token), or anywhere in between."""
    k = torch.randint(-1, vocab + 2, (n,), generator=g)
    pick = torch.rand(n, generator=g)
    k = torch.where(pick < 0.2, torch.ones_like(k), k)
    return torch.where((pick > 0.2) & (pick < 0.5), torch.randint(1, max(vocab, 2), (n,), generator=g), k)


def _top_p(g: torch.Generator, n: int) -> torch.Tensor:
    """top_p per row, some rows exactly 1 (and above): top-p off for them although the batch has top_p."""
    top_p = 0.05 + 0.95 * torch.rand(n, generator=g)
    u = torch.rand(n, generator=g)
    return torch.where(u < 0.2, torch.ones(n), torch.where(u < 0.25, torch.full((n,), 1.5), top_p))


def _temperature(g: torch.Generator, n: int) -> torch.Tensor:
    """Greedy rows (0 and just below GREEDY_TEMPERATURE) and sampled ones, some with an inexact 1/T."""
    t = 0.3 + 1.4 * torch.rand(n, generator=g)
    u = torch.rand(n, generator=g)
    return torch.where(u < 0.2, torch.zeros(n), torch.where(u < 0.25, torch.full((n,), 9e-6), t))


def _filtered_case(g: torch.Generator):
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    N, V = ri(1, 6), (ri(1, 300) if ri(0, 3) == 0 else ri(1, 40))
    logits = _tie_heavy_logits(g, N, V) if ri(0, 2) else torch.randn(N, V, generator=g) * 2
    temperature = _temperature(g, N)
    top_k = _top_k(g, N, V) if ri(0, 3) else None
    top_p = _top_p(g, N) if ri(0, 1) else None
    parts = ["FP", str(N), str(V), str(int(top_k is not None)), str(int(top_p is not None)), _fmt(temperature)]
    if top_k is not None:
        parts.append(_fmt(top_k))
    if top_p is not None:
        parts.append(_fmt(top_p))
    parts.append(_fmt(logits))
    return (logits, temperature, top_k, top_p), " ".join(parts)


def test_filtered_target_distribution_matches_reference(host_exe):
    """Kernel 1's statistics + target_prob = filtered_probs: the same tokens kept, the same probabilities."""
    g = torch.Generator().manual_seed(77)
    cases = [_filtered_case(g) for _ in range(400)]
    # Fixed rows: ties at the k-th value split by id, signed zeros tie, top_k = 1 on a tied maximum.
    fixed = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 3.0, 0.0, 1.0],
                          [0.0, -0.0, 0.0, -0.0, 0.0, -1.0, -0.0, 0.5]])
    for k in range(-1, 10):
        for t in (0.0, 0.7, 1.0):
            cases.append(((fixed, torch.full((2,), t), torch.full((2,), k), None),
                          " ".join(["FP", "2", "8", "1", "0", _fmt(torch.full((2,), t)), _fmt(torch.full((2,), k)),
                                    _fmt(fixed)])))
    lines = _run(host_exe, [c[1] for c in cases])
    assert len(lines) == len(cases)
    ties_split = top1 = topp_off = 0
    for i, (((logits, temperature, top_k, top_p), _), line) in enumerate(zip(cases, lines)):
        want = filtered_probs(logits, temperature, top_k, top_p)
        vals = torch.tensor([float(v) for v in line.split()], dtype=torch.float32).reshape(want.shape[0], -1)
        z2, host = vals[:, 0], vals[:, 1:]
        # No renormalisation where top-p is off for the row (top_p >= 1 too): z2 is exactly 1.
        off = torch.ones_like(z2, dtype=torch.bool) if top_p is None else top_p >= 1
        assert (z2[off] == 1.0).all(), f"case {i}: z2 {z2.tolist()} on rows without top-p"
        assert torch.equal(host > 0, want > 0), f"case {i}: support {host.tolist()} != {want.tolist()}"
        torch.testing.assert_close(host, want, rtol=1e-5, atol=1e-7, msg=f"case {i}")
        if top_k is not None:  # what the cases covered
            z = logits * (1.0 / torch.where(temperature < 1e-5, 1.0, temperature.float()))[:, None]
            for r in range(logits.shape[0]):
                k = int(top_k[r])
                if 0 < k < logits.shape[1] and temperature[r] >= 1e-5:
                    kth = torch.sort(z[r], descending=True).values[k - 1]
                    ties_split += int((z[r] == kth).sum() > 1 and (z[r] > kth).sum() + (z[r] == kth).sum() > k)
                    top1 += k == 1
        if top_p is not None:
            topp_off += int(((top_p >= 1) & (temperature >= 1e-5)).sum())
    assert ties_split > 50 and top1 > 30 and topp_off > 30, (ties_split, top1, topp_off)


def _rejection_case(g: torch.Generator):
    """Random inputs covering all draft modes, greedy rows, top-k/top-p, inactive requests, ties, invalid
    draft ids and unchecked-path metadata (lengths beyond the request's or the batch's rows)."""
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    R, G, V = ri(1, 5), ri(0, 4), ri(1, 40)
    mode = min(ri(0, 4), 3)  # 3 = draft_logits + draft_token_probs (byte-minimal), drawn twice as often
    lengths = torch.tensor([ri(0, G) for _ in range(R)], dtype=torch.int32)
    active = torch.rand(R, generator=g) > 0.15
    rows = torch.where(active, lengths + 1, torch.zeros_like(lengths))
    unchecked = ri(0, 4) == 0
    if unchecked:  # fewer rows than lengths[r] + 1 (still >= 1), or lengths outside [0, γ]
        rows = torch.where(active, torch.clamp(rows - torch.randint(0, 3, (R,), generator=g), min=1), rows)
        lengths = torch.where(torch.rand(R, generator=g) < 0.3, lengths + torch.randint(-2, 4, (R,), generator=g),
                              lengths).to(torch.int32)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(rows, 0)
    N = max(1, int(cu[-1]) + (ri(-2, 0) if unchecked else ri(0, 2)))  # unchecked: the last rows may not exist
    if ri(0, 2) == 0:  # coarse values: exact ties in z, p and the argmax
        logits = _tie_heavy_logits(g, N, V)
    else:
        logits = torch.randn(N, V, generator=g) * (0.5 + 2.5 * torch.rand(1, generator=g))
    temperature = _temperature(g, R)
    seed = torch.randint(-(2**62), 2**62, (R,), generator=g)
    offset = torch.tensor(ri(0, 2**40))
    top_k = _top_k(g, R, V) if ri(0, 1) else None
    top_p = _top_p(g, R) if ri(0, 1) else None
    # Drafts: from a perturbed copy of each request's target rows, so chains of acceptances occur.
    d_logits = torch.randn(R, G, V, generator=g)
    for r in range(R):
        for j in range(G):
            if int(cu[r]) + j < N:
                d_logits[r, j] = logits[int(cu[r]) + j] + 0.3 * d_logits[r, j]
    d_temp = _temperature(g, R)
    q = filtered_probs(d_logits.reshape(R * G, V), d_temp[:, None].expand(R, G).reshape(-1)).reshape(R, G, V)
    if R * G:
        drafts = torch.multinomial(q.reshape(R * G, V) + 1e-9, 1, generator=g).reshape(R, G)
        # Invalid draft ids: rejected, and their position's token drawn from the target row.
        bad = torch.rand(R, G, generator=g) < 0.12
        invalid = torch.where(torch.rand(R, G, generator=g) < 0.5, torch.full_like(drafts, -1),
                              V + torch.randint(0, 3, (R, G), generator=g))
        drafts = torch.where(bad, invalid, drafts)
    else:
        drafts = torch.zeros(R, G, dtype=torch.int64)
    kw = dict(top_k=top_k, top_p=top_p)
    draft_probs = None
    if mode == 1:
        draft_probs = q
    elif mode >= 2:
        kw["draft_logits"] = d_logits
        kw["draft_temperature"] = d_temp
        if mode == 3:
            # p_d(x) not always softmax(u)(x): q = p_d(x)·exp(u - u_x) is then not the softmax.
            p_dx = q.gather(-1, drafts.clamp(0, V - 1)[..., None]).squeeze(-1)
            scale = torch.where(torch.rand(R, G, generator=g) < 0.5, torch.ones(R, G),
                                0.2 + 1.6 * torch.rand(R, G, generator=g))
            kw["draft_token_probs"] = (p_dx * scale).clamp(1e-6, 1.0)
    args = (logits, drafts, draft_probs, lengths, cu, temperature, seed, offset)
    # Host program input (see rejection_case() in csrc/tests/host_math_sampling.cu).
    host_mode = min(mode, 2)
    parts = [
        "RS", str(R), str(G), str(V), str(N), str(host_mode), str(int(top_k is not None)),
        str(int(top_p is not None)), str(int(mode == 3)), str(int(offset)),
        _fmt(cu), _fmt(lengths), _fmt(temperature), _fmt(seed),
    ]
    if top_k is not None:
        parts.append(_fmt(top_k))
    if top_p is not None:
        parts.append(_fmt(top_p))
    if host_mode == 2:
        parts.append(_fmt(d_temp))
    parts += [_fmt(drafts), _fmt(logits)]
    if host_mode == 1:
        parts.append(_fmt(q))
    if host_mode == 2:
        parts.append(_fmt(d_logits))
        if mode == 3:
            parts.append(_fmt(kw["draft_token_probs"]))
    return args, kw, " ".join(p for p in parts if p)


def test_rejection_sample_host_emulation_matches_reference(host_exe):
    g = torch.Generator().manual_seed(1234)
    cases = [_rejection_case(g) for _ in range(400)]  # ~1200 requests
    lines = _run(host_exe, [c[2] for c in cases])
    assert len(lines) == len(cases)
    mismatches = []
    invalid_rejected = implied_residuals = 0
    for i, ((args, kw, _), line) in enumerate(zip(cases, lines)):
        tokens, n_acc = _reference(
            rejection_sample_op, *args, kw["top_k"], kw["top_p"], kw.get("draft_token_probs"),
            kw.get("draft_logits"), kw.get("draft_temperature"),
        )
        R, G = args[1].shape
        V = args[0].shape[1]
        host = torch.tensor([int(v) for v in line.split()], dtype=torch.int32)
        host_tokens, host_n = host[: R * (G + 1)].reshape(R, G + 1), host[R * (G + 1):]
        if not (torch.equal(host_tokens, tokens) and torch.equal(host_n, n_acc)):
            mismatches.append((i, tokens.tolist(), host_tokens.tolist(), n_acc.tolist(), host_n.tolist()))
        assert ((host_tokens >= -1) & (host_tokens < V)).all(), f"case {i}: an emitted id outside [0, V) or -1"
        # What the cases covered: rejections at an invalid draft; residuals from the byte-minimal q.
        cu, N = args[4].tolist(), args[0].shape[0]
        for r in range(R):
            live = cu[r + 1] > cu[r] and 0 <= cu[r] < N
            length = min(max(int(args[3][r]), 0), G, N - 1 - cu[r], cu[r + 1] - cu[r] - 1) if live else 0
            j = int(n_acc[r])
            if j < length and not 0 <= int(args[1][r, j]) < V:
                invalid_rejected += 1
            if j < length and "draft_token_probs" in kw and args[5][r] >= 1e-5:
                implied_residuals += 1
    assert not mismatches, f"{len(mismatches)} of {len(cases)} cases differ, first: {mismatches[0]}"
    assert invalid_rejected > 30 and implied_residuals > 40, (invalid_rejected, implied_residuals)


def _markov_case(g: torch.Generator):
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    R, G, K = ri(1, 3), ri(1, 4), ri(1, 8)
    V = ri(1, 300) if ri(0, 1) else ri(1, 20)  # > 128 spans several vocab tiles, with a ragged tail
    base = torch.randn(R, G, V, generator=g) * 2
    w1 = torch.randn(V, K, generator=g)
    w2 = torch.randn(V, K, generator=g) * 0.5
    anchor = torch.randint(-2, V + 2, (R,), generator=g)  # out of range: draft_block clamps it
    temperature = _temperature(g, R)
    seed = torch.randint(-(2**62), 2**62, (R,), generator=g)
    offset = torch.tensor(ri(0, 2**40))
    args = (base, anchor, w1, w2, temperature, seed, offset)
    text = " ".join([
        "MD", str(R), str(G), str(V), str(K), str(int(offset)), _fmt(anchor), _fmt(temperature), _fmt(seed),
        _fmt(base), _fmt(w1), _fmt(w2),
    ])
    return args, text


def test_markov_draft_host_emulation_matches_reference(host_exe):
    g = torch.Generator().manual_seed(4321)
    cases = [_markov_case(g) for _ in range(40)]
    lines = _run(host_exe, [c[1] for c in cases])
    assert len(lines) == len(cases)
    for i, ((args, _), line) in enumerate(zip(cases, lines)):
        out = _reference(markov_draft_op, *args, *([None] * 8), False, False)
        R, G, _ = args[0].shape
        vals = line.split()
        host_tokens = torch.tensor([int(v) for v in vals[: R * G]], dtype=torch.int32).reshape(R, G)
        host_probs = torch.tensor([float(v) for v in vals[R * G:]], dtype=torch.float32).reshape(R, G)
        tokens, token_probs = out[0], out[1]
        assert torch.equal(host_tokens, tokens), f"case {i}: {host_tokens.tolist()} != {tokens.tolist()}"
        torch.testing.assert_close(host_probs, token_probs, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# schedule_verify (csrc/schedule_verify.{cu,h}).
#
# csrc/tests/host_math_schedule_verify.cu emulates the kernel's one-block data
# flow on the host with the kernel's own functions (its header says what that
# covers and what only a GPU can check); the test compares it with the
# reference op.
# ---------------------------------------------------------------------------

import math
import struct

from dspark_kernels.ops import schedule_verify as schedule_verify_op

_SV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def sv_host_exe(tmp_path_factory):
    return build_host_program(tmp_path_factory.mktemp("sv_host_math"), "host_math_schedule_verify")


def _sv_bits(t: torch.Tensor) -> str:
    """Raw element bits as unsigned integers (exact for every float dtype)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    mask = (1 << (8 * t.element_size())) - 1
    return " ".join(str(v & mask) for v in t.contiguous().view(int_dtype).reshape(-1).tolist())


def _sv_values(g: torch.Generator, R: int, G: int) -> torch.Tensor:
    """[R, G] survival-like values: cumulative products, coarse ties and zeros, unsorted rows, constants."""
    kind = int(torch.randint(0, 6, (1,), generator=g))
    if kind == 0:  # cumulative product of confidences (the real input)
        return torch.cumprod(0.3 + 0.7 * torch.rand(R, G, generator=g), 1)
    if kind == 1:  # multiples of 1/8, many exact ties across requests, zeros (some -0.0: ties +0.0)
        v = torch.cumprod(torch.randint(0, 9, (R, G), generator=g).float() / 8, 1)
        return torch.where((v == 0) & (torch.rand(R, G, generator=g) < 0.5), -v, v)
    if kind == 2:  # not monotone, a few values outside [0, 1] (the op rejects both on CPU; keys must still order them)
        return torch.rand(R, G, generator=g) * 1.25 - 0.125
    if kind == 3:  # every request identical: ties broken by flat index only
        return torch.cumprod(0.5 + 0.5 * torch.rand(1, G, generator=g), 1).expand(R, G).clone()
    if kind == 4:
        return torch.full((R, G), float(torch.randint(0, 3, (1,), generator=g)) / 2)
    return torch.cumprod(torch.rand(R, G, generator=g) ** 0.25, 1)  # long tails of tiny values


def _sv_sps(g: torch.Generator, length: int) -> torch.Tensor:
    kind = int(torch.randint(0, 6, (1,), generator=g))
    b = torch.arange(length, dtype=torch.float32)
    if kind == 0:  # flat: theta rises iff the gain is positive
        sps = torch.ones(length)
    elif kind == 1:  # jagged
        sps = 0.2 + torch.rand(length, generator=g)
    elif kind == 2:  # the paper's shape: falling with the batch
        sps = 1.0 / (1.0 + 0.05 * b * float(torch.rand(1, generator=g)))
    elif kind == 3:  # staircase with exact ties and zeros
        sps = torch.randint(0, 4, (length,), generator=g).float() / 4
    elif kind == 4:  # falling fast: short schedules
        sps = 1.0 / (1.0 + b) ** 2
    else:  # NaN somewhere: torch.argmax's NaN rule, comparisons with NaN never rise
        sps = 0.5 + torch.rand(length, generator=g)
        sps[torch.randint(0, length, (max(1, length // 50),), generator=g)] = float("nan")
    sps[0] = 0.0
    return sps


def _sv_case(g: torch.Generator, R: int, G: int):
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    mode = "async" if ri(0, 1) else "causal"
    dtypes = [torch.float32] * 5 + [torch.float16, torch.bfloat16, torch.float64]
    sdt = dtypes[ri(0, len(dtypes) - 1)]
    hdt = dtypes[ri(0, len(dtypes) - 1)]
    surv = _sv_values(g, R, G).to(sdt)
    hist = None
    if mode == "async":
        which = ri(0, 2)
        hist = surv.to(hdt) if which == 0 else _sv_values(g, R, G).to(hdt)
        if which == 2:  # the current survival, a little perturbed
            hist = (surv.float() * (0.9 + 0.2 * torch.rand(R, G, generator=g))).clamp(0, 1).to(hdt)
    need = R * (G + 1) + 1
    sps_len = need if ri(0, 3) else (ri(1, need) if ri(0, 1) else need + ri(1, 40))  # short tables clamp
    sps = _sv_sps(g, sps_len).to(torch.float64 if ri(0, 4) == 0 else torch.float32)
    max_len = None
    if ri(0, 1):
        max_len = torch.randint(-2, G + 3, (R,), generator=g).to(torch.int64 if ri(0, 1) else torch.int32)
    active = None
    if ri(0, 1):
        active = torch.rand(R, generator=g) < (0.0 if ri(0, 9) == 0 else 0.8)
    capacity = None
    if mode == "async" and ri(0, 2) == 0:  # a given K instead of history: any, even out of range (unchecked)
        k = [ri(0, R * G + 2), ri(-3, 3), 2**40, -(2**40)][ri(0, 3) if ri(0, 3) == 0 else 0]
        dtype = torch.int64 if ri(0, 1) or abs(k) >= 2**31 else torch.int32
        capacity, hist = torch.tensor(k, dtype=dtype), None
    return _sv_encode((surv, sps, mode, hist, max_len, active, capacity), transposed=ri(0, 1) == 1)


def _sv_encode(args, transposed=False):
    """Host program input for reference arguments (survival, sps, mode, history, max_len, active[, capacity])."""
    surv, sps, mode, hist, max_len, active, capacity = (*args, None)[:7]
    R, G = surv.shape
    head = ["SV", str(int(mode == "async")), str(R), str(G), str(int(transposed)), str(_SV_DTYPES[surv.dtype]),
            str(_SV_DTYPES[hist.dtype if hist is not None else surv.dtype]), str(_SV_DTYPES[sps.dtype]),
            str(sps.shape[0]), str(int(max_len is not None)),
            str(int(max_len is not None and max_len.dtype == torch.int64)), str(int(active is not None)),
            str(0 if capacity is None else 1 if capacity.dtype == torch.int32 else 2)]
    parts = head + [_sv_bits(surv.t() if transposed else surv)]
    if capacity is not None:
        parts.append(str(int(capacity)))
    elif mode == "async":
        parts.append(_sv_bits(hist))
    parts.append(_sv_bits(sps))
    if max_len is not None:
        parts.append(" ".join(str(int(v)) for v in max_len.tolist()))
    if active is not None:
        parts.append(" ".join(str(int(v)) for v in active.tolist()))
    return args, " ".join(p for p in parts if p)


def test_schedule_verify_host_emulation_matches_reference(sv_host_exe):
    g = torch.Generator().manual_seed(2026)
    shapes = []
    for i in range(2500):
        R = 1 if i % 5 == 0 else int(torch.randint(1, 10 if i % 3 else 80, (1,), generator=g))
        shapes.append((R, int(torch.randint(1, 17, (1,), generator=g))))
    # Every block shape, its boundaries, R = 1 and R = 1024, the largest batch, and empty ones.
    shapes += [(1, 1), (1, 16), (64, 16), (65, 16), (256, 16), (257, 16), (512, 8), (512, 16), (513, 16),
               (1024, 8), (1024, 16), (1024, 16), (1024, 16), (16384, 1), (8192, 2), (700, 11), (3, 0),
               (2000, 0), (0, 5)]
    cases = [_sv_case(g, R, G) for R, G in shapes]
    # The paper's appendix A: causal verifies the anchor only, async both drafts.
    paper = (torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 0.5, 0.45]))
    cases += [_sv_encode((*paper, "causal", None, None, None)), _sv_encode((*paper, "async", paper[0], None, None))]
    lines = _run(sv_host_exe, [c[1] for c in cases])
    assert len(lines) == len(cases)
    mismatches = []
    configs = set()
    for i, ((args, _), line) in enumerate(zip(cases, lines)):
        lengths, cu, total, expected = _reference(schedule_verify_op, *args)
        R = args[0].shape[0]
        vals = [int(v) for v in line.split()]
        configs.add(vals[-1])
        host_len, host_cu = vals[:R], vals[R: 2 * R + 1]
        host_total, host_exp_bits = vals[2 * R + 1], vals[2 * R + 2]
        want_bits = struct.unpack("<I", struct.pack("<f", float(expected)))[0]
        got = (host_len, host_cu, host_total)
        want = (lengths.tolist(), cu.tolist(), int(total))
        host_exp = struct.unpack("<f", struct.pack("<I", host_exp_bits))[0]
        same_exp = host_exp_bits == want_bits or (math.isnan(host_exp) and math.isnan(float(expected)))
        if got != want or not same_exp:
            mismatches.append((i, args[0].shape, args[2], want, got, want_bits, host_exp_bits))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} cases differ, first: {mismatches[0]}"
    assert configs == {0, 1, 2, 3}, f"not every block shape ran: {sorted(configs)}"
