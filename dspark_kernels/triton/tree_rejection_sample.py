"""Triton tree_rejection_sample: implements dspark_kernels.tree_rejection_sample, token for token the reference.

Four launches, no host sync, grids from shapes only:

1. rejection_sample's ``_row_kernel``, one program per target row: the row's
   statistics (max, normaliser, first argmax; the exact top-k / top-p
   thresholds), so any token's filtered target probability is one logit load.
2. ``_walk_kernel``, one program per request: one scan over the node index
   (the children of a node come after it, so a descent never looks back),
   testing each child of the current node with one logit and one draft
   probability. With sampled drafts the residual of the siblings is
   w = max(p - S·q, 0) for a scalar S (siblings share q), so it is never
   stored: the walk keeps S and the mass M = Σ w, and computes M with one
   pass over the row only when a rejected sibling is followed by another
   sibling (a chain never pays it). With deterministic candidates a rejected
   token is zeroed and M drops by its probability: no pass at all (a repeated
   token is found by looking at the earlier siblings). The walk writes the
   accepted path into accepted_nodes.
3. ``_race_kernel``, S programs per request, each owning a vocabulary slice of
   the final row: the residual (or bonus) race, Gumbel-max on one Philox
   block per 4 lanes, for both the residual weights and p (the fallback when
   the residual has no mass).
4. ``_merge_kernel``, one program per request: the slices' winners (first
   slice wins ties), then the output rows.

Uniforms and stream layout come from dspark_kernels.triton.rng, identical to
the reference (the op's docstring lists them).
"""

import torch
import triton
import triton.language as tl

from .. import constants as C
from . import rng
from .ragged import request_rows
from .rejection_sample import (BLOCK_V, _slices, _target_prob, load_row_stats, merged_token, race_tile, row_statistics,
                               store_race_partials)
from .sampling import greedy_and_inverse, scaled_tile_mul

STREAM_ACCEPT = tl.constexpr(C.STREAM_ACCEPT)
STREAM_TREE_ACCEPT = tl.constexpr(C.STREAM_TREE_ACCEPT)
STREAM_RESIDUAL = tl.constexpr(C.STREAM_RESIDUAL)
STREAM_BONUS = tl.constexpr(C.STREAM_BONUS)
# Walk outcome per request (int32 words): depth, final row, tried, first child, direct token, final node, n.
WALK_WORDS = tl.constexpr(7)
# The walk is scalar work except the residual-mass pass over 1024-lane tiles: 8 warps hold 4 lanes per
# thread (64 registers on sm_90, no spill; 4 warps spilled 4 B of the stochastic walk, measured by AOT compile).
WALK_WARPS = 8


@triton.jit
def _load_stats(stats_f_ptr, stats_i_ptr, row, live):
    """load_row_stats and the row's argmax (the walk's greedy test)."""
    m, zk, pthr, z2, kth_key, kth_id = load_row_stats(stats_f_ptr, stats_i_ptr, row, live)
    amax = tl.load(stats_i_ptr + row * 3 + 2, mask=live, other=0)
    return m, zk, pthr, z2, kth_key, kth_id, amax


@triton.jit
def _residual_mass(lrow_ptr, qrow_ptr, stride_pv, vocab, inv_t, big_s, m, zk, pthr, z2, kth_key, kth_id,
                   BLOCK: tl.constexpr):
    """M = Σ_i max(p_i - S·q_i, 0) over one row: the mass left after the rejected siblings."""
    offs = tl.arange(0, BLOCK)
    mass = tl.full((), 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        inside = idx < vocab
        z = scaled_tile_mul(lrow_ptr, idx, inside, inv_t)
        p = tl.where(inside, _target_prob(z, idx, m, zk, pthr, z2, kth_key, kth_id), 0.0)
        sq = big_s * tl.load(qrow_ptr + idx * stride_pv, mask=inside, other=0.0).to(tl.float32)
        mass += tl.sum(tl.where(p > sq, p - sq, 0.0), 0)
    return mass


@triton.jit
def _walk_kernel(
    logits_ptr, stride_l, num_rows, vocab, stats_f_ptr, stats_i_ptr,
    tok_ptr, stride_kr, stride_kn, par_ptr, stride_ar, stride_an, nn_ptr, stride_nn,
    cu_ptr, stride_cu, temp_ptr, stride_temp, seed_ptr, stride_seed, offset_ptr,
    dprobs_ptr, stride_pr, stride_pn, stride_pv,
    nodes_ptr, stride_nodes, walk_i_ptr, walk_f_ptr, n_max,
    STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    # Trusted only as far as the value checks went: every index is clamped (as rejection_sample).
    start, live, n = request_rows(cu_ptr, stride_cu, r, num_rows, tl.load(nn_ptr + r * stride_nn), n_max)
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r * stride_temp))
    seed = tl.load(seed_ptr + r * stride_seed)
    offset = tl.load(offset_ptr)
    row = tl.where(live, start, 0)
    m, zk, pthr, z2, kth_key, kth_id, amax = _load_stats(stats_f_ptr, stats_i_ptr, row, live)

    cur = tl.full((), -1, tl.int64)  # the current node; -1 is the anchor
    depth = tl.full((), 0, tl.int64)
    tried = tl.full((), 0, tl.int1)  # a child of cur was tested (and rejected)
    first = tl.full((), 0, tl.int64)  # cur's first child: the row of q
    big_s = tl.full((), 0.0, tl.float32)
    mass = tl.full((), 1.0, tl.float32)
    need_mass = tl.full((), 0, tl.int1)
    for j in range(0, n):
        jj = j + tl.zeros((), tl.int64)
        par = tl.load(par_ptr + r * stride_ar + jj * stride_an).to(tl.int64)
        if par == cur:
            x = tl.load(tok_ptr + r * stride_kr + jj * stride_kn).to(tl.int64)
            valid = (x >= 0) & (x < vocab)
            xc = tl.minimum(tl.maximum(x, 0), vocab - 1)
            first = tl.where(tried, first, jj)
            z_x = tl.load(logits_ptr + row * stride_l + xc).to(tl.float32) * inv_t
            p_x = _target_prob(z_x, xc, m, zk, pthr, z2, kth_key, kth_id)
            qrow = dprobs_ptr + r * stride_pr + first * stride_pn
            if STOCHASTIC:
                if need_mass:
                    # Only now is M_k needed: the pass is paid when a rejected sibling has a successor.
                    mass = _residual_mass(logits_ptr + row * stride_l, qrow, stride_pv, vocab, inv_t, big_s,
                                          m, zk, pthr, z2, kth_key, kth_id, BLOCK)
                    need_mass = False
                q_x = tl.load(qrow + xc * stride_pv).to(tl.float32)
                sq = big_s * q_x
                w_x = tl.where(p_x > sq, p_x - sq, 0.0)
                fresh = valid
            else:
                # A token already rejected among cur's children (they all were, or the walk had descended).
                dup = tl.full((), 0, tl.int1)
                for k in range(cur + 1, jj):
                    pk = tl.load(par_ptr + r * stride_ar + k * stride_an).to(tl.int64)
                    xk = tl.load(tok_ptr + r * stride_kr + k * stride_kn).to(tl.int64)
                    dup = dup | ((pk == cur) & (xk == x))
                q_x = tl.full((), 1.0, tl.float32)
                w_x = tl.where(dup, 0.0, p_x)
                fresh = valid & ~dup
            coin_first = rng.uniform(seed, offset, STREAM_ACCEPT, depth, 0)
            coin_next = rng.uniform(seed, offset, STREAM_TREE_ACCEPT, depth, jj)
            coin = tl.where(tried, coin_next, coin_first)
            accept = valid & tl.where(greedy, xc == amax, coin * q_x * mass < w_x)
            if accept:
                tl.store(nodes_ptr + r * stride_nodes + depth, jj.to(tl.int32))
                depth += 1
                cur = jj
                row = start + 1 + jj
                m, zk, pthr, z2, kth_key, kth_id, amax = _load_stats(stats_f_ptr, stats_i_ptr, row, live)
                tried = False
                big_s = 0.0
                mass = 1.0
                need_mass = False
            else:
                tried = True
                if STOCHASTIC:
                    upd = fresh & ~greedy
                    big_s = tl.where(upd, big_s + mass, big_s)
                    need_mass = need_mass | upd
                else:
                    mass = tl.where(fresh, tl.maximum(mass - w_x, 0.0), mass)
    direct = tl.where(live, tl.where(greedy, tl.minimum(tl.maximum(amax, 0), vocab - 1), -2), -1)
    out = walk_i_ptr + r * WALK_WORDS
    tl.store(out, depth.to(tl.int32))
    tl.store(out + 1, row.to(tl.int32))
    tl.store(out + 2, tried.to(tl.int32))
    tl.store(out + 3, first.to(tl.int32))
    tl.store(out + 4, direct.to(tl.int32))
    tl.store(out + 5, cur.to(tl.int32))
    tl.store(out + 6, n.to(tl.int32))
    tl.store(walk_f_ptr + r, big_s)


@triton.jit
def _race_kernel(
    logits_ptr, stride_l, vocab, stats_f_ptr, stats_i_ptr,
    tok_ptr, stride_kr, stride_kn, par_ptr, stride_ar, stride_an,
    dprobs_ptr, stride_pr, stride_pn, stride_pv, temp_ptr, stride_temp, seed_ptr, stride_seed, offset_ptr,
    walk_i_ptr, walk_f_ptr, part_f_ptr, part_i_ptr, slice_width, num_slices,
    STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    walk = walk_i_ptr + r * WALK_WORDS
    depth = tl.load(walk).to(tl.int64)
    row = tl.load(walk + 1).to(tl.int64)
    tried = tl.load(walk + 2) != 0
    first = tl.load(walk + 3).to(tl.int64)
    direct = tl.load(walk + 4)
    cur = tl.load(walk + 5).to(tl.int64)
    n = tl.load(walk + 6).to(tl.int64)
    big_s = tl.load(walk_f_ptr + r)
    live = direct != -1
    _greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r * stride_temp))
    seed = tl.load(seed_ptr + r * stride_seed)
    offset = tl.load(offset_ptr)
    m, zk, pthr, z2, kth_key, kth_id = load_row_stats(stats_f_ptr, stats_i_ptr, row, live)
    qrow = dprobs_ptr + r * stride_pr + first * stride_pn

    v_lo = sl * slice_width
    v_hi = tl.minimum(v_lo + slice_width, vocab)
    offs = tl.arange(0, BLOCK)
    stream = tl.where(tried, STREAM_RESIDUAL, STREAM_BONUS)
    best_w = tl.full((), float("-inf"), tl.float32)
    arg_w = v_lo.to(tl.int32)
    best_p = tl.full((), float("-inf"), tl.float32)
    arg_p = v_lo.to(tl.int32)
    mass_w = tl.full((), 0.0, tl.float32)
    if direct == -2:  # live and not greedy: a race decides
        for v0 in range(v_lo, v_hi, BLOCK):
            idx = v0 + offs
            inside = idx < v_hi
            z = scaled_tile_mul(logits_ptr + row * stride_l, idx, inside, inv_t)
            p = tl.where(inside, _target_prob(z, idx, m, zk, pthr, z2, kth_key, kth_id), 0.0)
            if STOCHASTIC:
                q = tl.load(qrow + idx * stride_pv, mask=inside & tried, other=0.0).to(tl.float32)
                sq = big_s * q
                w = tl.where(p > sq, p - sq, 0.0)
            else:
                # Every child of the final node was rejected (or it has none): their tokens are zeroed.
                w = p
                for k in range(cur + 1, n):
                    pk = tl.load(par_ptr + r * stride_ar + k * stride_an).to(tl.int64)
                    xk = tl.load(tok_ptr + r * stride_kr + k * stride_kn).to(tl.int64)
                    w = tl.where((pk == cur) & (idx == xk), 0.0, w)
            mass_w += tl.sum(w, 0)
            best_w, arg_w, best_p, arg_p = race_tile(best_w, arg_w, best_p, arg_p, w, p, inside, seed, offset,
                                                     stream, depth, v0, BLOCK)
    store_race_partials(part_f_ptr, part_i_ptr, r * num_slices + sl, best_w, best_p, mass_w, arg_w, arg_p)


@triton.jit
def _merge_kernel(
    part_f_ptr, part_i_ptr, walk_i_ptr, tok_ptr, stride_kr, stride_kn,
    tokens_ptr, stride_out, nacc_ptr, nodes_ptr, stride_nodes, n_max, num_slices,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    walk = walk_i_ptr + r * WALK_WORDS
    depth = tl.load(walk).to(tl.int64)
    direct = tl.load(walk + 4)
    y = merged_token(part_f_ptr, part_i_ptr, r, num_slices, direct, BLOCK_S)
    k = tl.arange(0, BLOCK_N).to(tl.int64)
    on_path = k < depth
    node = tl.load(nodes_ptr + r * stride_nodes + k, mask=on_path, other=0).to(tl.int64)
    x = tl.load(tok_ptr + r * stride_kr + node * stride_kn, mask=on_path, other=-1).to(tl.int64)
    val = tl.where(on_path, x, tl.where(k == depth, y, -1))
    tl.store(tokens_ptr + r * stride_out + k, val.to(tl.int32), mask=k <= n_max)
    # The walk wrote the path (k < depth); the rest of accepted_nodes is padding.
    tl.store(nodes_ptr + r * stride_nodes + k, tl.full((BLOCK_N,), -1, tl.int32), mask=(k >= depth) & (k < n_max))
    tl.store(nacc_ptr + r, depth.to(tl.int32))


def tree_rejection_sample(a):
    device = a.target_logits.device
    num_rows, vocab = a.target_logits.shape
    num_req, n_max = a.tree_tokens.shape
    tokens = torch.empty((num_req, n_max + 1), dtype=torch.int32, device=device)
    num_accepted = torch.empty((num_req,), dtype=torch.int32, device=device)
    nodes = torch.empty((num_req, n_max), dtype=torch.int32, device=device)
    if num_req == 0:
        return tokens, num_accepted, nodes
    logits, stats_f, stats_i, cand = row_statistics(a, num_rows, vocab, num_req)
    stochastic = a.draft_probs is not None
    dprobs = a.draft_probs if stochastic else stats_f[None]  # never read without draft_probs (constexpr)
    walk_i = torch.empty((num_req, WALK_WORDS.value), dtype=torch.int32, device=device)
    walk_f = torch.empty((num_req,), dtype=torch.float32, device=device)
    toks, pars = a.tree_tokens, a.tree_parents
    _walk_kernel[(num_req,)](
        logits, logits.stride(0), num_rows, vocab, stats_f, stats_i,
        toks, toks.stride(0), toks.stride(1), pars, pars.stride(0), pars.stride(1), a.num_nodes, a.num_nodes.stride(0),
        a.cu_verify, a.cu_verify.stride(0), a.temperature, a.temperature.stride(0), a.seed, a.seed.stride(0), a.offset,
        dprobs, dprobs.stride(0), dprobs.stride(1), dprobs.stride(2),
        nodes, nodes.stride(0), walk_i, walk_f, n_max,
        STOCHASTIC=stochastic, BLOCK=BLOCK_V, num_warps=WALK_WARPS,
    )
    width, num_slices = _slices(num_req, vocab, 0, False)  # the chain sampler's slicing (one-hot mode's rule)
    part_f = torch.empty((num_req, num_slices, 3), dtype=torch.float32, device=device)
    part_i = torch.empty((num_req, num_slices, 3), dtype=torch.int32, device=device)
    _race_kernel[(num_req, num_slices)](
        logits, logits.stride(0), vocab, stats_f, stats_i,
        toks, toks.stride(0), toks.stride(1), pars, pars.stride(0), pars.stride(1),
        dprobs, dprobs.stride(0), dprobs.stride(1), dprobs.stride(2), a.temperature, a.temperature.stride(0),
        a.seed, a.seed.stride(0), a.offset, walk_i, walk_f, part_f, part_i, width, num_slices,
        STOCHASTIC=stochastic, BLOCK=BLOCK_V,
    )
    _merge_kernel[(num_req,)](
        part_f, part_i, walk_i, toks, toks.stride(0), toks.stride(1),
        tokens, tokens.stride(0), num_accepted, nodes, nodes.stride(0), n_max, num_slices,
        BLOCK_S=min(1024, triton.next_power_of_2(num_slices)), BLOCK_N=triton.next_power_of_2(n_max + 1),
    )
    return tokens, num_accepted, nodes


def _compile_specs():
    """(kernel, signature, constexprs[, options]) tuples that tests compile for sm_90 ahead of time."""
    walk = {"logits_ptr": "*bf16", "stride_l": "i64", "num_rows": "i32", "vocab": "i32", "stats_f_ptr": "*fp32",
            "stats_i_ptr": "*i32", "tok_ptr": "*i32", "stride_kr": "i64", "stride_kn": "i64", "par_ptr": "*i32",
            "stride_ar": "i64", "stride_an": "i64", "nn_ptr": "*i32", "stride_nn": "i64", "cu_ptr": "*i32",
            "stride_cu": "i64", "temp_ptr": "*fp32", "stride_temp": "i64", "seed_ptr": "*i64", "stride_seed": "i64",
            "offset_ptr": "*i64", "dprobs_ptr": "*fp32", "stride_pr": "i64", "stride_pn": "i64", "stride_pv": "i64",
            "nodes_ptr": "*i32", "stride_nodes": "i64", "walk_i_ptr": "*i32", "walk_f_ptr": "*fp32", "n_max": "i32",
            "STOCHASTIC": "constexpr", "BLOCK": "constexpr"}
    race = {"logits_ptr": "*bf16", "stride_l": "i64", "vocab": "i32", "stats_f_ptr": "*fp32", "stats_i_ptr": "*i32",
            "tok_ptr": "*i32", "stride_kr": "i64", "stride_kn": "i64", "par_ptr": "*i32", "stride_ar": "i64",
            "stride_an": "i64", "dprobs_ptr": "*fp32", "stride_pr": "i64", "stride_pn": "i64", "stride_pv": "i64",
            "temp_ptr": "*fp32", "stride_temp": "i64", "seed_ptr": "*i64", "stride_seed": "i64", "offset_ptr": "*i64",
            "walk_i_ptr": "*i32", "walk_f_ptr": "*fp32", "part_f_ptr": "*fp32", "part_i_ptr": "*i32",
            "slice_width": "i32", "num_slices": "i32", "STOCHASTIC": "constexpr", "BLOCK": "constexpr"}
    merge = {"part_f_ptr": "*fp32", "part_i_ptr": "*i32", "walk_i_ptr": "*i32", "tok_ptr": "*i32", "stride_kr": "i64",
             "stride_kn": "i64", "tokens_ptr": "*i32", "stride_out": "i64", "nacc_ptr": "*i32", "nodes_ptr": "*i32",
             "stride_nodes": "i64", "n_max": "i32", "num_slices": "i32", "BLOCK_S": "constexpr", "BLOCK_N": "constexpr"}
    specs = []
    for stochastic in (False, True):
        specs.append((_walk_kernel, walk, {"STOCHASTIC": stochastic, "BLOCK": BLOCK_V}, {"num_warps": WALK_WARPS}))
        specs.append((_race_kernel, race, {"STOCHASTIC": stochastic, "BLOCK": BLOCK_V}))
    specs.append((_merge_kernel, merge, {"BLOCK_S": 16, "BLOCK_N": 64}))
    return specs
