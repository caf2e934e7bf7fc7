"""verify_attention: the reference against an independent dense formulation,
every backend against both on ragged paged batches (chains, random trees,
windows, soft-caps, GQA, empty requests, padding rows, non-contiguous inputs),
flash-decoding splits, argument validation, opcheck / torch.compile, and a
smoke run of the benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dspark_kernels import _backend
from dspark_kernels.ops import verify_attention as op

from conftest import DEVICE, available_backends

BACKENDS = available_backends(op)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERP = DEVICE == "cpu" and _backend.triton_interpret()

# Tolerances. fp32: inputs are O(1), logits O(5); each output is a convex
# combination of value rows whose weights carry a relative rounding error of
# about eps32 * (|logit| + log L) ~ 1.2e-7 * 20 = 2.4e-6 whatever the summation
# order (ours, torch's einsum/logsumexp, the kernel's online exp2 softmax), so a
# 1e-5 bound relative to the output scale is ~4x the expected fp32 error and far
# below any masking or indexing bug (those are O(0.1)). Measured here: ~5e-7.
# bf16/fp16 (GPU only): the kernel rounds the softmax weights to the input dtype
# for the P·V tensor-core product (rel. 4e-3 / 5e-4 per weight) and the output
# is rounded once more, so 2e-2 / 4e-3 relative.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


# ---------------------------------------------------------------------------
# Building batches.
# ---------------------------------------------------------------------------


def random_parents(n: int, g: torch.Generator) -> list[int]:
    """A random tree over the block in topological order: parent[t] < t, token 0 is the root."""
    return [-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, n)]


def ancestors(parents: list[int], t: int) -> set[int]:
    out = {t}
    while parents[t] >= 0:
        t = parents[t]
        out.add(t)
    return out


def pack_rows(rows: list[set[int]], words: int) -> torch.Tensor:
    """Bit j of word j // 32 for each j in the row's set, as int32 (two's complement)."""
    packed = torch.zeros((len(rows), words), dtype=torch.int64)
    for i, row in enumerate(rows):
        for j in row:
            packed[i, j // 32] += 1 << (j % 32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def make_batch(ns, ctx, *, hkv=2, group=4, dim=16, page_size=3, tree=False, words=2, pad_rows=2,
               noncontig=False, dtype=torch.float32, qscale=1.0, seed=0):
    """Random ragged batch; pages of every request scattered by a random permutation."""
    g = torch.Generator().manual_seed(seed)
    num_req = len(ns)
    kv_lens = [c + n for c, n in zip(ctx, ns)]
    need = [math.ceil(L / page_size) for L in kv_lens]
    max_pages = max(need + [0]) + 1
    num_pages = sum(need) + 3
    perm = torch.randperm(num_pages, generator=g)
    page_table = torch.full((num_req, max_pages), -1, dtype=torch.int32)  # unused entries: never read
    used = 0
    for r in range(num_req):
        page_table[r, : need[r]] = perm[used: used + need[r]].to(torch.int32)
        used += need[r]
    cu = [0]
    for n in ns:
        cu.append(cu[-1] + n)
    rows = cu[-1] + pad_rows
    hq = hkv * group
    if noncontig:  # q with every stride != the contiguous one; k/v interleaved in one buffer
        q = (torch.randn(hq, rows, 2 * dim, generator=g) * qscale).transpose(0, 1)[..., ::2]
        kv = torch.randn(num_pages, page_size, 2, hkv, dim, generator=g)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        q = torch.randn(rows, hq, dim, generator=g) * qscale
        k = torch.randn(num_pages, page_size, hkv, dim, generator=g)
        v = torch.randn(num_pages, page_size, hkv, dim, generator=g)
    parents = [random_parents(n, g) if tree else None for n in ns]
    tree_mask = None
    if tree:
        sets = [ancestors(p, t) for p, n in zip(parents, ns) for t in range(n)] + [set()] * pad_rows
        tree_mask = pack_rows(sets, words)
    to = lambda t: None if t is None else t.to(DEVICE)
    args = dict(q=to(q.to(dtype)), k_cache=to(k.to(dtype)), v_cache=to(v.to(dtype)), page_table=to(page_table),
                kv_lens=to(torch.tensor(kv_lens, dtype=torch.int32)), cu_verify=to(torch.tensor(cu, dtype=torch.int32)),
                tree_mask=to(tree_mask))
    return args, parents


def dense(args, parents, *, sm_scale=None, window=-1, softcap=0.0, dtype=torch.float64):
    """Independent formulation: every key gathered position by position, the full
    [n_r, kv_len] mask written out from the parent arrays, torch.softmax."""
    a = {k: (v.cpu() if v is not None else None) for k, v in args.items()}
    q, kc, vc = a["q"].to(dtype), a["k_cache"].to(dtype), a["v_cache"].to(dtype)
    rows, hq, dim = q.shape
    page_size, hkv = kc.shape[1], kc.shape[2]
    scale = sm_scale if sm_scale is not None else dim ** -0.5
    out = torch.zeros(rows, hq, dim, dtype=dtype)
    lse = torch.full((rows, hq), float("-inf"), dtype=dtype)
    cu, lens = a["cu_verify"].tolist(), a["kv_lens"].tolist()
    for r in range(len(lens)):
        n, L = cu[r + 1] - cu[r], lens[r]
        if n == 0:
            continue
        ctx = L - n
        keys = torch.stack([kc[a["page_table"][r, p // page_size], p % page_size] for p in range(L)])
        vals = torch.stack([vc[a["page_table"][r, p // page_size], p % page_size] for p in range(L)])
        mask = torch.zeros(n, L, dtype=torch.bool)
        for t in range(n):
            pos = ctx + t
            seen = set(range(t + 1)) if parents[r] is None else ancestors(parents[r], t)
            for kp in range(L):
                ok = kp < ctx or (kp - ctx) in seen
                if window > 0:
                    ok = ok and pos - window < kp <= pos
                mask[t, kp] = ok
        for h in range(hq):
            kh = h // (hq // hkv)
            s = q[cu[r]: cu[r + 1], h] @ keys[:, kh].T * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~mask, float("-inf"))
            out[cu[r]: cu[r + 1], h] = torch.softmax(s, dim=-1) @ vals[:, kh]
            lse[cu[r]: cu[r + 1], h] = torch.logsumexp(s, dim=-1)
    return out, lse


def run(backend, args, **kw):
    return op.verify_attention(**args, backend=backend, return_lse=True, **kw)


def assert_close(out, lse, ref_out, ref_lse, dtype, rows_used):
    out, lse = out.cpu().double(), lse.cpu().double()
    ref_out, ref_lse = ref_out.double(), ref_lse.double()
    tol = TOL[dtype]
    scale = max(1.0, float(ref_out.abs().max())) if ref_out.numel() else 1.0
    err = float((out[:rows_used] - ref_out[:rows_used]).abs().max()) if rows_used else 0.0
    assert err <= tol * scale, f"out error {err:.3g} > {tol * scale:.3g}"
    if rows_used:
        lerr = float(((lse[:rows_used] - ref_lse[:rows_used]).abs() / (1 + ref_lse[:rows_used].abs())).max())
        assert lerr <= tol, f"lse error {lerr:.3g}"
    # padding rows past cu_verify[R]: zero output, -inf lse
    assert torch.all(out[rows_used:] == 0) and torch.all(lse[rows_used:] == float("-inf"))


# name -> (make_batch kwargs, op kwargs). Odd sizes throughout; the Triton
# interpreter is slow, so shapes stay small (head dim 64 appears twice).
CASES = {
    "chain_gqa4_ps3": (dict(ns=[3, 1, 0, 5], ctx=[7, 0, 4, 20]), {}),
    "single_query_no_context": (dict(ns=[1], ctx=[0], hkv=1, group=1, dim=64, page_size=1), {}),
    "tree_ps16_d32": (dict(ns=[4, 2, 6], ctx=[17, 33, 5], group=1, dim=32, page_size=16, tree=True), {}),
    "tree_one_word": (dict(ns=[5, 3], ctx=[2, 9], tree=True, words=1, page_size=1), {}),
    "window_gqa8": (dict(ns=[5, 0, 3], ctx=[40, 9, 0], hkv=1, group=8), dict(window=6)),
    "window_shorter_than_block": (dict(ns=[6, 4], ctx=[3, 11], page_size=16), dict(window=2)),
    "tree_softcap_window_d64": (dict(ns=[2, 7], ctx=[12, 25], dim=64, page_size=16, tree=True, qscale=3.0),
                                dict(softcap=5.0, window=9)),
    "softcap_scale_noncontig": (dict(ns=[4, 1, 3], ctx=[6, 0, 30], noncontig=True, qscale=3.0),
                                dict(softcap=2.5, sm_scale=0.4)),
    "tree_40_rows_two_words": (dict(ns=[40], ctx=[5], hkv=1, group=1, page_size=3, tree=True, pad_rows=0), {}),
    "chain_36_rows_row_tiles": (dict(ns=[36, 2], ctx=[3, 1], hkv=1, group=1, pad_rows=1), {}),
    "all_requests_empty": (dict(ns=[0, 0], ctx=[5, 0], pad_rows=3), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_dense_formulation(name):
    """The reference is not its own judge: fp32 reference vs an fp64 dense build."""
    make, kw = CASES[name]
    args, parents = make_batch(**make)
    out, lse = run("reference", args, **kw)
    ref_out, ref_lse = dense(args, parents, **kw)
    assert_close(out, lse, ref_out, ref_lse, torch.float32, int(args["cu_verify"][-1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_matches_reference(backend, name):
    make, kw = CASES[name]
    args, parents = make_batch(**make)
    out, lse = run(backend, args, **kw)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype and out.is_contiguous()
    assert lse.shape == args["q"].shape[:2] and lse.dtype == torch.float32
    ref_out, ref_lse = run("reference", args, **kw)
    assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), torch.float32, int(args["cu_verify"][-1]))
    # only-out form returns the same output
    alone = op.verify_attention(**args, backend=backend, **kw)
    assert torch.equal(alone, out)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16/fp16 kernels need a GPU (the interpreter runs fp32 only)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["chain_gqa4_ps3", "tree_softcap_window_d64", "softcap_scale_noncontig"])
def test_low_precision_matches_reference(backend, dtype, name):
    make, kw = CASES[name]
    args, _ = make_batch(**make, dtype=dtype)
    out, lse = run(backend, args, **kw)
    assert out.dtype == dtype
    ref_out, ref_lse = run("reference", {k: (v.float() if v is not None and v.is_floating_point() else v)
                                         for k, v in args.items()}, **kw)
    assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), dtype, int(args["cu_verify"][-1]))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not available")
@pytest.mark.parametrize("splits", [2, 7])
@pytest.mark.parametrize("name", ["chain_gqa4_ps3", "tree_softcap_window_d64", "window_gqa8"])
def test_triton_flash_decoding_splits(splits, name):
    """KV range split across programs, partials merged by LSE; 7 splits leave some empty."""
    from dspark_kernels.triton.verify_attention import verify_attention as tri

    make, kw = CASES[name]
    args, _ = make_batch(**make)
    full = dict(sm_scale=args["q"].shape[-1] ** -0.5, window=-1, softcap=0.0) | kw
    a = dict(args, **full)
    for want_lse in (True, False):
        out, lse = tri(*a.values(), want_lse, num_splits=splits)
        ref_out, ref_lse = run("reference", args, **kw)
        if want_lse:
            assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), torch.float32, int(args["cu_verify"][-1]))
        else:
            assert lse.numel() == 0
            assert float((out.cpu() - ref_out.cpu()).abs().max()) <= 1e-5 * max(1.0, float(ref_out.abs().max()))


def test_split_count_from_static_bounds():
    from dspark_kernels.triton import verify_attention as tri_mod

    dev = torch.device("cpu")  # 4 pretend SMs: fill twice = 8 programs
    assert tri_mod.choose_num_splits(1, 1, 32768, dev) == 8
    assert tri_mod.choose_num_splits(1, 1, 300, dev) == 1  # < 2 * 256 keys: one split
    assert tri_mod.choose_num_splits(64, 8, 32768, dev) == 1
    assert tri_mod.choose_num_splits(1, 1, 10**7, dev) <= 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    args, _ = make_batch([], [], pad_rows=0)
    out, lse = run(backend, args)
    assert out.shape == (0, 8, 16) and lse.shape == (0, 8)
    args, _ = make_batch([2], [3], pad_rows=0)
    args["q"] = args["q"][:0]
    args["cu_verify"] = torch.zeros_like(args["cu_verify"])
    out, lse = run(backend, args)
    assert out.shape == (0, 8, 16)


def test_lse_is_natural_log_of_sum_exp():
    """lse recombines partial attentions: splitting the keys by hand and merging agrees."""
    args, parents = make_batch([3], [10], hkv=1, group=2, page_size=4)
    out, lse = run("reference", args)
    _, dense_lse = dense(args, parents)
    assert torch.allclose(lse.cpu().double(), dense_lse, rtol=0, atol=1e-5)
    out_noscale = op.verify_attention(**args, sm_scale=1.0)
    assert not torch.allclose(out_noscale, out)


# ---------------------------------------------------------------------------
# Validation: every message names the argument.
# ---------------------------------------------------------------------------


def _good():
    args, _ = make_batch([2, 3], [4, 1], tree=True)
    return {k: v.cpu() for k, v in args.items()}


def _bad(**changes):
    a = _good()
    for k, v in changes.items():
        a[k] = v(a) if callable(v) else v
    return a


BAD = [
    (ValueError, "q must have 3 dimensions", dict(q=lambda a: a["q"][0])),
    (TypeError, "q must have dtype", dict(q=lambda a: a["q"].double())),
    (ValueError, "k_cache must have 4 dimensions", dict(k_cache=lambda a: a["k_cache"][0])),
    (TypeError, "k_cache has dtype float16", dict(k_cache=lambda a: a["k_cache"].half())),
    (TypeError, "v_cache has dtype bfloat16", dict(v_cache=lambda a: a["v_cache"].bfloat16())),
    (ValueError, "k_cache has head dim 15", dict(k_cache=lambda a: a["k_cache"][..., :15])),
    (ValueError, "v_cache must have the shape", dict(v_cache=lambda a: a["v_cache"][:, :2])),
    (ValueError, "q has 5 heads, not a multiple", dict(q=lambda a: a["q"][:, :5])),
    (TypeError, "page_table must have dtype", dict(page_table=lambda a: a["page_table"].float())),
    (ValueError, "page_table must have 2 dimensions", dict(page_table=lambda a: a["page_table"][0])),
    (ValueError, "kv_lens must have shape", dict(kv_lens=lambda a: a["kv_lens"][:1])),
    (ValueError, "cu_verify must have shape", dict(cu_verify=lambda a: a["cu_verify"][:2])),
    (TypeError, "tree_mask must have dtype", dict(tree_mask=lambda a: a["tree_mask"].long())),
    (ValueError, "tree_mask must have shape", dict(tree_mask=lambda a: torch.zeros(7, 3, dtype=torch.int32))),
    (ValueError, "tree_mask must have shape", dict(tree_mask=lambda a: a["tree_mask"][:3])),
    # value checks
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([1, 2, 5], dtype=torch.int32))),
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([0, 3, 2], dtype=torch.int32))),
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([0, 3, 8], dtype=torch.int32))),
    (ValueError, "kv_lens must include the verify tokens", dict(kv_lens=torch.tensor([6, 2], dtype=torch.int32))),
    (ValueError, "page_table has 3 pages per request", dict(kv_lens=torch.tensor([6, 10], dtype=torch.int32))),
    (ValueError, "page_table holds page ids outside", dict(page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([0]), 99))),
    (ValueError, "page_table holds page ids outside", dict(page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([0]), -1))),
    (ValueError, "tree_mask row t must set bit t", dict(tree_mask=lambda a: a["tree_mask"] & ~torch.tensor([[2, 0]], dtype=torch.int32))),
    (ValueError, "tree_mask row t may set only bits j <= t", dict(tree_mask=lambda a: a["tree_mask"] | torch.tensor([[4, 0]], dtype=torch.int32))),
    (ValueError, "tree_mask row t may set only bits j <= t", dict(tree_mask=lambda a: a["tree_mask"] | torch.tensor([[0, 1]], dtype=torch.int32))),
]


@pytest.mark.parametrize("exc,match,changes", BAD, ids=[m for _, m, _ in BAD])
def test_bad_arguments_named(exc, match, changes):
    with pytest.raises(exc, match=match):
        op.verify_attention(**_bad(**changes), backend="reference")


def test_bad_scalars_named():
    for kw, match in ((dict(window=0), "window"), (dict(window=-2), "window"), (dict(softcap=-1.0), "softcap"),
                      (dict(softcap=float("inf")), "softcap"), (dict(sm_scale=0.0), "sm_scale"),
                      (dict(sm_scale=float("nan")), "sm_scale")):
        with pytest.raises(ValueError, match=match):
            op.verify_attention(**_good(), **kw)


def test_tree_limit_64_tokens():
    args, _ = make_batch([65], [0], hkv=1, group=1, pad_rows=0)
    args = {k: v.cpu() if v is not None else v for k, v in args.items()}
    rows = [set(range(min(t + 1, 64))) for t in range(65)]  # bit 64 does not fit: checked first
    with pytest.raises(ValueError, match="tree_mask holds 64 tokens per row but a request verifies 65"):
        op.verify_attention(**dict(args, tree_mask=pack_rows(rows, 2)))
    with pytest.raises(ValueError, match="tree_mask holds 32 tokens"):
        op.verify_attention(**dict(args, tree_mask=pack_rows([{0}] * 65, 1)))
    # without a tree, long blocks are fine
    assert op.verify_attention(**args).shape == args["q"].shape


# ---------------------------------------------------------------------------
# Capturability: opcheck (schema, fake, dynamic shapes) and torch.compile.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree", [False, True])
def test_opcheck(tree):
    args, _ = make_batch([2, 0, 3], [4, 2, 1], tree=tree)
    args = {k: v.cpu() if v is not None else v for k, v in args.items()}
    for lse in (True, False):
        torch.library.opcheck(torch.ops.dspark.verify_attention.default,
                              (*args.values(), None, 3 if tree else -1, 1.5 if tree else 0.0, lse, "reference"))


def test_compile_fullgraph():
    args, _ = make_batch([3, 1], [5, 0], tree=True)
    args = {k: v.cpu() if v is not None else v for k, v in args.items()}
    eager = op.verify_attention(**args, window=4, return_lse=True, backend="reference")

    @torch.compile(fullgraph=True, backend="inductor")
    def f(a):
        return op.verify_attention(**a, window=4, return_lse=True, backend="reference")

    out, lse = f(args)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])


# ---------------------------------------------------------------------------
# Benchmark smoke run.
# ---------------------------------------------------------------------------


def test_bench_quick_runs(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "bench", "harness.py")):
        pytest.skip("bench/harness.py (shared harness) not written yet")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    report = tmp_path / "va.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_verify_attention.py"), "--quick",
                          "--iters", "1", "--warmup", "0", "--quiet", "--out", str(report)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(report.read_text())
    assert not data["errors"], data["errors"]
    for case in data["cases"]:
        for name, rec in case["providers"].items():
            if rec["status"] == "ok" and rec.get("max_abs_err_vs_reference") is not None:
                assert rec["max_abs_err_vs_reference"] < 1e-5, (case["name"], name, rec)
            if name in ("reference-eager", "sdpa"):
                assert rec["status"] == "ok", (name, rec)

    # the tree path of the benchmark (masks for the torch peers), in process
    sys.path.insert(0, ROOT)
    from bench import bench_verify_attention as bench

    tree = bench.main(["--quick", "--tree", "--requests", "3", "--iters", "1", "--warmup", "0", "--quiet",
                       "--providers", "reference-eager,sdpa", "--device", "cpu"])
    rec = tree["cases"][0]["providers"]["sdpa"]
    assert rec["status"] == "ok" and rec["max_abs_err_vs_reference"] < 1e-5
