"""verify_attention: the reference against an independent dense formulation,
every backend against both on ragged paged batches (chains, random trees,
windows, soft-caps, GQA, empty requests, padding rows, non-contiguous inputs),
flash-decoding splits, the tree-size limit, the NaN policy, no host sync in the
Triton launcher (grid from static bounds), opcheck / torch.compile, and a smoke
run of the benchmark. GPU only: bf16/fp16 within a bound relative to PyTorch's
own error at that precision, 128k contexts, CUDA-graph capture and replay.
Argument validation: tests/test_validation.py."""

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

from host_sync import HostSyncSpy
from paged_batch import ancestors, make_batch
from support import DEVICE, available_backends, capture_graph, debug_mode, interpreted

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
# The independent formulation (batches: tests/paged_batch.py).
# ---------------------------------------------------------------------------


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
        seen_of = [set(range(t + 1)) if parents[r] is None else ancestors(parents[r], t) for t in range(n)]
        # Logical positions: context key kp at kp, block row j at ctx + its depth (= j on a chain), so a
        # window counts the row's own text (the same path verified as a chain sees the same keys).
        logical = [kp if kp < ctx else ctx + len(seen_of[kp - ctx]) - 1 for kp in range(L)]
        for t in range(n):
            pos = ctx + len(seen_of[t]) - 1
            for kp in range(L):
                ok = kp < ctx or (kp - ctx) in seen_of[t]
                if window > 0:
                    ok = ok and pos - window < logical[kp] <= pos
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
    # The acceptance matrix (test_case_matrix_covers_acceptance checks that it stays covered):
    # head dim 128 with 256-key pages and a context long enough for the default split count
    # (4 flash-decoding splits under the interpreter) next to a plain decode row with no context.
    "page256_d128_default_splits": (dict(ns=[3, 1], ctx=[700, 0], hkv=1, group=4, dim=128, page_size=256), {}),
    # head dim 256, GQA 8, an odd page size, soft-cap.
    "d256_gqa8_softcap": (dict(ns=[2, 1], ctx=[9, 0], hkv=1, group=8, dim=256, page_size=5, qscale=2.0),
                          dict(softcap=4.0)),
    # 64 verify tokens (both mask words, bits 31 and 63 are sign bits), no context, 1-key pages.
    "tree_64_rows_page1": (dict(ns=[64, 1], ctx=[0, 3], hkv=1, group=1, dim=64, page_size=1, tree=True), {}),
    "chain_64_rows_gqa4_window": (dict(ns=[64, 2], ctx=[5, 1], hkv=1, group=4, page_size=7), dict(window=20)),
    # GQA 7 (28 query heads over 4 kv heads in Qwen2.5-7B) and a head dim that is no power of two.
    "gqa7_d80": (dict(ns=[2, 3], ctx=[5, 11], hkv=1, group=7, dim=80, page_size=6), {}),
    # int64 metadata, every tensor a strided view, tree + window + soft-cap together.
    "tree_int64_noncontig_window_softcap": (dict(ns=[3, 5, 1], ctx=[4, 0, 2], tree=True, noncontig=True,
                                                 index_dtype=torch.int64, qscale=2.0),
                                            dict(window=3, softcap=1.5)),
}


def test_case_matrix_covers_acceptance():
    """GQA 1/4/8, head dims 64/128/256, pages of 1 and 256 keys, an odd page count,
    n_r = 1 and 64 (two mask words), context 0, windows and soft-caps alone and
    together, trees of one and two words, strided inputs: all in CASES, so on
    every backend (the interpreter included)."""
    seen = dict(group=set(), dim=set(), page_size=set(), n=set(), odd_pages=False, ctx0=set(), extras=set(),
                words=set(), noncontig=False)
    for make, kw in CASES.values():
        args, _ = make_batch(**make)
        seen["group"].add(args["q"].shape[1] // args["k_cache"].shape[2])
        seen["dim"].add(args["q"].shape[2])
        seen["page_size"].add(args["k_cache"].shape[1])
        seen["n"].update(make["ns"])
        seen["odd_pages"] |= args["k_cache"].shape[0] % 2 == 1
        seen["ctx0"].update(n for n, c in zip(make["ns"], make["ctx"]) if c == 0)
        seen["extras"].add(("window" in kw, "softcap" in kw))
        if make.get("tree"):
            seen["words"].add(args["tree_mask"].shape[1])
        seen["noncontig"] |= make.get("noncontig", False)
    assert {1, 4, 8} <= seen["group"] and {64, 128, 256} <= seen["dim"] and {1, 256} <= seen["page_size"]
    assert {0, 1, 64} <= seen["n"] and seen["odd_pages"] and {0, 1, 3} <= seen["ctx0"]
    assert seen["extras"] == {(False, False), (True, False), (False, True), (True, True)}
    assert seen["words"] == {1, 2} and seen["noncontig"]


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


# bf16/fp16: the reference everywhere (fp32 math, output rounded once), the kernels on
# a GPU only (the interpreter runs fp32). The bound is the acceptance one: the error
# against the fp64 truth of the same rounded inputs may be at most twice the error
# of the same computation done by PyTorch in that precision (scores, softmax and
# P·V in bf16/fp16: dense(..., dtype=dtype)), plus fp32 noise; and within TOL of
# the fp32 reference.
LOWP_BACKENDS = [b for b in BACKENDS if not interpreted(b)]


@pytest.mark.parametrize("backend", LOWP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["chain_gqa4_ps3", "tree_softcap_window_d64", "softcap_scale_noncontig",
                                  "d256_gqa8_softcap", "page256_d128_default_splits"])
def test_low_precision_error_bound(backend, dtype, name):
    make, kw = CASES[name]
    args, parents = make_batch(**make, dtype=dtype)
    out, lse = run(backend, args, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    rows = int(args["cu_verify"][-1])
    truth_out, truth_lse = dense(args, parents, **kw)
    pt_out, pt_lse = dense(args, parents, dtype=dtype, **kw)
    scale = max(1.0, float(truth_out.abs().max()))
    err = float((out.cpu().double()[:rows] - truth_out[:rows]).abs().max())
    pt_err = float((pt_out.double()[:rows] - truth_out[:rows]).abs().max())
    assert err <= 2 * pt_err + TOL[torch.float32] * scale, f"out error {err:.3g} vs PyTorch {dtype}: {pt_err:.3g}"
    lerr = float((lse.cpu().double()[:rows] - truth_lse[:rows]).abs().max())
    pt_lerr = float((pt_lse.double()[:rows] - truth_lse[:rows]).abs().max())
    assert lerr <= 2 * pt_lerr + TOL[torch.float32] * (1 + float(truth_lse[:rows].abs().max()))
    ref_out, ref_lse = run("reference", {k: (v.float() if v is not None and v.is_floating_point() else v)
                                         for k, v in args.items()}, **kw)
    assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), dtype, rows)


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
        out, lse = tri(op.OP.record(**a, return_lse=want_lse), num_splits=splits)
        ref_out, ref_lse = run("reference", args, **kw)
        if want_lse:
            assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), torch.float32, int(args["cu_verify"][-1]))
        else:
            assert lse.numel() == 0
            assert float((out.cpu() - ref_out.cpu()).abs().max()) <= 1e-5 * max(1.0, float(ref_out.abs().max()))


@pytest.mark.skipif(not INTERP, reason="the Triton interpreter runs only on CPU tensors")
def test_interpreter_refuses_bf16():
    """Regression: the interpreter's bf16 tl.dot is wrong by orders of magnitude, so the
    interpreted Triton path returned garbage for bf16 inputs; it now refuses, naming q.
    fp16 is emulated correctly and stays allowed."""
    args, _ = make_batch([2, 3], [4, 1], dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q has dtype bfloat16"):
        run("triton", args)
    args, _ = make_batch([2, 3], [4, 1], dtype=torch.float16)
    out, lse = run("triton", args)
    ref_out, ref_lse = run("reference", {k: (v.float() if v is not None and v.is_floating_point() else v)
                                         for k, v in args.items()})
    assert_close(out, lse, ref_out, ref_lse, torch.float16, int(args["cu_verify"][-1]))


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


@pytest.mark.parametrize("tree,kw", [(False, {}), (True, dict(window=128, softcap=30.0))],
                         ids=["chain", "tree_window128_softcap"])
def test_reference_long_context(tree, kw):
    """A few thousand keys per request against the fp64 dense build (window 128 as in
    DeepSeek-V4's draft). 128k is left to the GPU (test_128k_context_gpu): the dense
    build here gathers keys position by position in Python and the interpreter runs
    ~10 ms per key chunk, so 128k would take minutes on CPU and prove nothing more
    about the masks; what 128k adds (int64 offsets, the split count, fp32 sums over
    2^17 keys) is a property of the compiled kernel."""
    args, parents = make_batch([5, 1, 3], [4093, 2500, 0], hkv=2, group=4, dim=64, page_size=16, tree=tree)
    out, lse = run("reference", args, **kw)
    ref_out, ref_lse = dense(args, parents, **kw)
    assert_close(out, lse, ref_out, ref_lse, torch.float32, int(args["cu_verify"][-1]))


@pytest.mark.gpu  # 128k-key contexts
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree,kw", [(False, {}), (True, dict(window=128, softcap=30.0))],
                         ids=["chain", "tree_window128_softcap"])
def test_128k_context_gpu(backend, dtype, tree, kw):
    """Two requests, one at 128k keys: 64 flash-decoding splits without a window, one
    with it; cache offsets past 2^31 bytes; against the fp32 reference on the same inputs."""
    args, _ = make_batch([4, 1], [131072 - 4, 70001], hkv=2, group=4, dim=128, page_size=256, tree=tree,
                         dtype=dtype)
    out, lse = run(backend, args, **kw)
    ref_out, ref_lse = run("reference", {k: (v.float() if v is not None and v.is_floating_point() else v)
                                         for k, v in args.items()}, **kw)
    assert_close(out, lse, ref_out.cpu(), ref_lse.cpu(), dtype, int(args["cu_verify"][-1]))


# ---------------------------------------------------------------------------
# NaN policy (documented in ops.verify_attention): non-finite values propagate
# and are never checked; what a request does not read cannot leak in.
# ---------------------------------------------------------------------------


def _clone(args):
    return {k: (v.clone() if v is not None else None) for k, v in args.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_outside_read_range_never_leaks(backend):
    """NaN in every cache slot no request reads (page tails past kv_lens, spare pages,
    the pages of a request with no verify rows, keys before the window), garbage
    page ids past ceil(kv_lens / page_size), NaN q padding rows and all-ones tree
    padding rows: the result is bit-identical to the clean run."""
    window = 4
    args, _ = make_batch([3, 2, 0, 1], [10, 1, 4, 0], page_size=4, tree=True, pad_rows=3)
    kw = dict(window=window, softcap=3.0)
    clean_out, clean_lse = run(backend, args, **kw)
    dirty = _clone(args)
    pt, lens, cu = args["page_table"].cpu(), args["kv_lens"].tolist(), args["cu_verify"].tolist()
    num_pages, page_size = args["k_cache"].shape[:2]
    read = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for r, kv_len in enumerate(lens):
        n = cu[r + 1] - cu[r]
        if n:
            for pos in range(max(0, kv_len - n + 1 - window), kv_len):
                read[pt[r, pos // page_size], pos % page_size] = True
        dirty["page_table"][r, math.ceil(kv_len / page_size):] = 10**6
    assert (~read).sum() > 20 and (~read.any(1)).any()  # partial pages and whole unread pages
    unread = (~read).to(DEVICE)
    dirty["k_cache"][unread] = float("nan")
    dirty["v_cache"][unread] = float("nan")
    dirty["q"][cu[-1]:] = float("nan")
    dirty["tree_mask"][cu[-1]:] = -1
    out, lse = run(backend, dirty, **kw)
    assert torch.equal(out, clean_out) and torch.equal(lse, clean_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_within_its_reach(backend):
    """A NaN in q[i, h] reaches out[i, h] and lse[i, h] only; a NaN key or value read
    by request 0 poisons request 0 (not silently masked) and never request 1."""
    args, _ = make_batch([3, 2], [5, 2], hkv=2, group=4)
    clean_out, clean_lse = (t.cpu() for t in run(backend, args))
    rows0 = slice(0, 3)

    def same(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    dirty = _clone(args)
    dirty["q"][1, 5, 3] = float("nan")
    out, lse = (t.cpu() for t in run(backend, dirty))
    hit = torch.zeros(out.shape[:2], dtype=torch.bool)
    hit[1, 5] = True
    assert out[1, 5].isnan().all() and lse[1, 5].isnan()
    assert same(out[~hit], clean_out[~hit]) and same(lse[~hit], clean_lse[~hit])

    page0 = int(args["page_table"][0, 0])  # key position 0 of request 0: context, seen by all its rows
    for name in ("v_cache", "k_cache"):
        dirty = _clone(args)
        dirty[name][page0, 0, 0, 2] = float("nan")  # kv head 0 -> query heads 0..3
        out, lse = (t.cpu() for t in run(backend, dirty))
        if name == "v_cache":  # only dim 2 of the outputs is touched; lse does not read values
            assert out[rows0, :4, 2].isnan().all() and same(lse, clean_lse)
        else:
            assert out[rows0, :4].isnan().all() and lse[rows0, :4].isnan().all()
        assert not out[rows0, 4:].isnan().any() and not lse[rows0, 4:].isnan().any()
        assert same(out[3:], clean_out[3:]) and same(lse[3:], clean_lse[3:])  # request 1 and padding


# ---------------------------------------------------------------------------
# No host sync: launch parameters from static bounds only.
# ---------------------------------------------------------------------------

class _KernelStub:
    """Stands in for a @triton.jit kernel: records kernel[grid](*args, **meta)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **meta):
            scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
            self.log.append((self.name, tuple(grid), scalars, tuple(sorted(meta.items()))))
        return launch


def _launches(monkeypatch, args, kw, *, spy=True):
    from dspark_kernels.triton import verify_attention as tri_mod

    log = []
    monkeypatch.setattr(tri_mod, "_verify_attn_kernel", _KernelStub("attn", log))
    monkeypatch.setattr(tri_mod, "_merge_kernel", _KernelStub("merge", log))
    full = dict(sm_scale=args["q"].shape[-1] ** -0.5, window=-1, softcap=0.0) | kw
    with HostSyncSpy() as s:
        out, lse = tri_mod.verify_attention(op.OP.record(**args, **full, return_lse=True))
    if spy:
        assert s.syncs == [], f"host syncs in the Triton launcher: {s.syncs}"
    assert out.shape == args["q"].shape and lse.shape == args["q"].shape[:2]
    return log


@pytest.mark.skipif(not _backend._triton_importable(), reason="Triton not installed")
@pytest.mark.parametrize("tree,kw", [(False, {}), (True, dict(window=7, softcap=2.0))])
def test_triton_launcher_no_host_sync_static_grid(monkeypatch, tree, kw):
    """The launcher (kernels stubbed out, so no interpreter) reads no tensor value:
    the launch parameters are a function of shapes alone. (The reference is not
    spied: it loops over requests on the host by design, through .tolist(), which
    a dispatch spy does not even see; it is not the path to capture.)
    no sync op under a dispatch spy on CPU tensors, the same grid, constexprs and
    scalar arguments for two batches of one shape but different lengths, and it
    runs on meta tensors, which have no values at all (the GPU tile config)."""
    shape = dict(hkv=2, group=4, dim=16, page_size=16, tree=tree, max_pages=40, rows=12)
    # One cache size too (45 pages: 42 + 3 spare and 41 + 4): its page count is a launch argument.
    a, _ = make_batch([3, 1, 4], [600, 0, 30], seed=1, spare_pages=3, **shape)
    b, _ = make_batch([1, 5, 0], [2, 9, 620], seed=2, spare_pages=4, **shape)
    a = {k: (v.cpu() if v is not None else None) for k, v in a.items()}
    b = {k: (v.cpu() if v is not None else None) for k, v in b.items()}
    log_a, log_b = _launches(monkeypatch, a, kw), _launches(monkeypatch, b, kw)
    assert log_a == log_b
    assert [name for name, *_ in log_a] == (["attn", "merge"] if not kw else ["attn"])
    assert log_a[0][1][:2] == (3, 2)  # (requests, kv heads, splits)
    meta_args = {k: (v.to("meta") if v is not None else None) for k, v in a.items()}
    log_meta = _launches(monkeypatch, meta_args, kw, spy=False)
    assert log_meta[0][1] == log_a[0][1]
    # ... and the op's metadata checks (all that runs on CUDA outside debug mode) read nothing either
    full = dict(sm_scale=None, window=-1, softcap=0.0) | kw
    with HostSyncSpy() as s:
        op.OP.check(op.OP.record(**a, **full, return_lse=True))
    assert s.syncs == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_no_host_sync_cuda(backend):
    """On CUDA tensors (debug mode off) the kernel path reads nothing back: no sync
    op under the spy, and CUDA's own sync detector stays silent over the public op."""
    with debug_mode(False):
        args, _ = make_batch([3, 1, 4], [600, 0, 30], tree=True, page_size=16)
        op.verify_attention(**args, backend=backend, window=9, return_lse=True)  # compile outside the checks
        torch.cuda.synchronize()
        with HostSyncSpy() as s:
            op.OP.run(backend, op.OP.record(**args, sm_scale=0.25, window=9, softcap=0.0, return_lse=True))
        assert s.syncs == []
        torch.cuda.set_sync_debug_mode("error")
        try:
            op.verify_attention(**args, backend=backend, window=9, return_lse=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("variant", ["chain_splits", "tree_window_softcap"])
def test_cuda_graph_capture_replay(backend, variant):
    """Capture once, replay with new values AND new ragged lengths of the same
    shapes (q rows, page-table width, cache size): each replay equals an eager call
    bit for bit and the reference within fp32 tolerance."""
    with debug_mode(False):  # value checks would sync
        tree = variant != "chain_splits"
        kw = {} if not tree else dict(window=128, softcap=20.0)
        shape = dict(hkv=2, group=4, dim=64, page_size=16, tree=tree, max_pages=200, rows=40, spare_pages=0)
        trials = [([5, 1, 0], [3000, 0, 7]), ([1, 8, 3], [12, 2900, 100]), ([0, 0, 1], [0, 5, 3100]),
                  ([16, 16, 6], [40, 1, 2999])]
        batches = []
        for seed, (ns, ctx) in enumerate(trials):
            spare = 3 * 200 - sum(math.ceil((c + n) / 16) for c, n in zip(ctx, ns))  # one cache size for all
            batches.append(make_batch(ns, ctx, seed=seed, **dict(shape, spare_pages=spare))[0])
        static = _clone(batches[0])

        def step():
            return op.verify_attention(**static, backend=backend, return_lse=True, **kw)

        graph, (g_out, g_lse) = capture_graph(step, warmup=2)
        for fresh in batches[1:] + batches[:1]:
            for name, t in fresh.items():
                if t is not None:
                    static[name].copy_(t)
            graph.replay()
            torch.cuda.synchronize()
            e_out, e_lse = op.verify_attention(**fresh, backend=backend, return_lse=True, **kw)
            assert torch.equal(g_out, e_out) and torch.equal(g_lse, e_lse)
            r_out, r_lse = run("reference", fresh, **kw)
            assert_close(g_out, g_lse, r_out.cpu(), r_lse.cpu(), torch.float32, int(fresh["cu_verify"][-1]))


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
