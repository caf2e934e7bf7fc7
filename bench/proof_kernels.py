"""Call every Triton and CUDA kernel of the package once, on small odd shapes.

``bench.gpu_proof`` runs this under compute-sanitizer (memcheck, then
racecheck): each call below launches the kernels of one op variant on one
backend, so the sanitizer sees every kernel at least once, with vocab sizes
that are not a multiple of any block (1001), a request of length 0 beside full
ones, greedy rows beside sampled ones, and top-k / top-p on. Every output is
also compared with the reference backend on the same inputs: integer outputs
(tokens, lengths, offsets) must be equal, float outputs close (fp32 1e-4,
bf16 inputs 3e-2 relative to the largest value).

Run: ``python -m bench.proof_kernels`` (CUDA tensors when torch sees a GPU;
else CPU tensors with Triton through its interpreter, which this sets).
Prints one line per (op variant, backend) and exits 1 if any call raised or
disagreed with the reference, 0 otherwise.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import torch

if not torch.cuda.is_available():  # before triton is imported: the interpreter runs kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dspark_kernels as dk  # noqa: E402
from dspark_kernels.ops import advance as adv_op  # noqa: E402
from dspark_kernels.ops import append_verify_kv as av_op  # noqa: E402
from dspark_kernels.ops import markov_draft as md_op  # noqa: E402
from dspark_kernels.ops import pack_verify as pv_op  # noqa: E402
from dspark_kernels.ops import philox_uniform as pu_op  # noqa: E402
from dspark_kernels.ops import rejection_sample as rs_op  # noqa: E402
from dspark_kernels.ops import schedule_verify as sv_op  # noqa: E402
from dspark_kernels.ops import verify_attention as va_op  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's bf16 math is wrong (README), so CPU runs stay in fp32.
LOW = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
V_ODD = 1001  # not a multiple of any block size
R, GAMMA, RANK, HID = 5, 4, 16, 24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _common(g) -> dict:
    """Per-request sampling state: greedy, cool, plain and hot rows; distinct seeds."""
    return dict(
        temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 1.0], device=DEVICE),
        seed=torch.arange(R, device=DEVICE, dtype=torch.int64) + 77,
        offset=torch.tensor(2**33 + 3, device=DEVICE, dtype=torch.int64),
    )


# --------------------------------------------------------------------------- op variants


def philox(backend):
    g = _gen(0)
    c = _common(g)
    return dk.philox_uniform(c["seed"], c["offset"], stream=2, position=3, n=V_ODD, backend=backend)


def markov(head: str, dtype: torch.dtype, exact: bool = True):
    def call(backend):
        g = _gen(1)
        x = dict(base_logits=_randn(R, GAMMA, V_ODD, g=g, dtype=dtype),
                 anchor=torch.randint(0, V_ODD, (R,), generator=g, device=DEVICE),
                 w1=_randn(V_ODD, RANK, g=g, dtype=dtype, scale=0.3), w2=_randn(V_ODD, RANK, g=g, dtype=dtype, scale=0.3),
                 **_common(g))
        kw = {}
        if head != "vanilla":
            kw.update(hidden=_randn(R, GAMMA, HID, g=g, dtype=dtype), conf_weight=_randn(HID + RANK, g=g, scale=0.2),
                      conf_bias=torch.tensor(0.3, device=DEVICE), sts_temperature=torch.linspace(0.8, 1.5, GAMMA, device=DEVICE))
        if head == "gated":
            kw.update(gate_weight=_randn(RANK, HID + RANK, g=g, scale=0.2), gate_bias=_randn(RANK, g=g, scale=0.1))
        if head == "rnn":
            kw.update(rnn_weight=_randn(3 * RANK, 2 * RANK + HID, g=g, scale=0.2), rnn_bias=_randn(3 * RANK, g=g, scale=0.1))
        out = dk.markov_draft(*x.values(), **kw, return_draft_probs=True, return_draft_logits=True, exact=exact,
                              backend=backend)
        return tuple(t for t in out if t is not None)
    return call


def schedule(mode: str):
    def call(backend):
        g = _gen(2)
        n, gamma = 37, 5
        conf = 0.3 + 0.7 * torch.rand(n, gamma, generator=g, device=DEVICE)
        hist = 0.3 + 0.7 * torch.rand(n, gamma, generator=g, device=DEVICE)
        B = torch.arange(n * (gamma + 1) + 1, device=DEVICE, dtype=torch.float32)
        sps = 1.0 / (0.02 * torch.clamp(B / 64.0, min=1.0))
        active = torch.ones(n, dtype=torch.bool, device=DEVICE)
        active[3] = False
        max_len = torch.full((n,), gamma, dtype=torch.int32, device=DEVICE)
        max_len[5] = 2
        out = dk.schedule_verify(torch.cumprod(conf, 1), sps, mode=mode,
                                 history=torch.cumprod(hist, 1) if mode == "async" else None,
                                 max_len=max_len, active=active, backend=backend)
        return tuple(out)
    return call


def _pack_inputs(seed: int):
    """(generator, anchor, tokens, lengths, cu_verify, start_pos) of pack_verify for R requests, one with no
    drafts."""
    g = _gen(seed)
    lengths = torch.tensor([GAMMA, 0, 2, GAMMA, 1], dtype=torch.int32, device=DEVICE)
    cu = torch.zeros(R + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.cumsum(lengths + 1, 0)
    tokens = torch.randint(0, V_ODD, (R, GAMMA), generator=g, device=DEVICE, dtype=torch.int32)
    anchor = torch.randint(0, V_ODD, (R,), generator=g, device=DEVICE, dtype=torch.int32)
    start = torch.tensor([5, 0, 17, 100, 9], dtype=torch.int32, device=DEVICE)
    return g, anchor, tokens, lengths, cu, start


def pack(backend):
    _, anchor, tokens, lengths, cu, start = _pack_inputs(3)
    return tuple(dk.pack_verify(anchor, tokens, lengths, cu, start, backend=backend))


def pack_bucket(backend):
    """pack_verify into a 40-row bucket with a page table of 5-slot pages and a scratch slot."""
    g, anchor, tokens, lengths, cu, start = _pack_inputs(5)
    page_table = torch.randperm(R * 25, generator=g, device=DEVICE).reshape(R, 25).to(torch.int32)
    return tuple(dk.pack_verify(anchor, tokens, lengths, cu, start, num_rows=40, page_table=page_table, page_size=5,
                                num_pages=R * 25 + 1, scratch_slot=R * 25 * 5, pad_token=7, backend=backend))


def append_kv(backend):
    """append_verify_kv, bf16 on a GPU, D = 80 (masked head dim), pages of 5, one slot out of range (skipped);
    distinct slots otherwise, so every backend writes the same cache."""
    g = _gen(6)
    rows, heads, dim, pages, page_size = 37, 3, 80, 11, 5
    key, value = _randn(rows, heads, dim, g=g, dtype=LOW), _randn(rows, heads, dim, g=g, dtype=LOW)
    slots = torch.randperm(pages * page_size, generator=g, device=DEVICE)[:rows]
    slots[4] = -1
    k_cache = torch.zeros(pages, page_size, heads, dim, dtype=LOW, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    dk.append_verify_kv(key, value, k_cache, v_cache, slots, backend=backend)
    return k_cache, v_cache


def attention_bad_metadata(backend):
    """verify_attention with value checks off (main() turns them off) and metadata an unchecked engine
    could hand it: a page id past the cache and one negative, a kv_lens past the page table, cu_verify
    past q's rows (monotone, so every backend covers the same rows and must agree)."""
    from bench import bench_verify_attention as bva

    x = bva.make_case(3, 37, hq=8, hkv=2, dim=64, page_size=16, dtype=LOW, device=DEVICE, tree=False).make_inputs()
    x["page_table"][0, 1] = 10**6
    x["page_table"][2, 0] = -5
    x["kv_lens"][1] = 10**6
    x["cu_verify"][-1] += 9
    return dk.verify_attention(**x, return_lse=True, backend=backend)


def advance(backend):
    from dspark_kernels.ops.advance import example

    return tuple(dk.advance(**example(DEVICE), backend=backend))


def attention(tree: bool, dtype: torch.dtype):
    from bench import bench_verify_attention as bva

    def call(backend):
        case = bva.make_case(3, 37, hq=8, hkv=2, dim=64, page_size=16, dtype=dtype, device=DEVICE, tree=tree)
        x = case.make_inputs()
        kw = dict(window=24, softcap=20.0) if tree else {}
        return dk.verify_attention(**x, **kw, return_lse=True, backend=backend)
    return call


def rejection(mode: str, filters: bool):
    def call(backend):
        g = _gen(4)
        lengths = torch.tensor([GAMMA, 0, 2, GAMMA, 3], dtype=torch.int32, device=DEVICE)
        cu = torch.zeros(R + 1, dtype=torch.int32, device=DEVICE)
        cu[1:] = torch.cumsum(lengths + 1, 0)
        T = R * (GAMMA + 1)  # static padded rows; rows past cu[R] are ignored
        drafts = torch.randint(0, V_ODD, (R, GAMMA), generator=g, device=DEVICE, dtype=torch.int32)
        target = _randn(T, V_ODD, g=g, scale=2.0)
        # Peak the target at the drafts so that some are accepted and some rejected.
        rows = (cu[:-1, None] + torch.arange(GAMMA, device=DEVICE)).clamp(max=T - 1)
        target[rows.reshape(-1), drafts.reshape(-1).long()] += 6.0
        draft_logits = _randn(R, GAMMA, V_ODD, g=g, scale=2.0)
        draft_logits.scatter_add_(-1, drafts[..., None].long(), torch.full((R, GAMMA, 1), 6.0, device=DEVICE))
        q = torch.softmax(draft_logits, -1)
        c = _common(g)
        kw = dict(top_k=torch.tensor([0, 7, 50, V_ODD + 5, 1], dtype=torch.int32, device=DEVICE),
                  top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0], device=DEVICE)) if filters else {}
        probs = None
        if mode == "probs":
            probs = q
        elif mode == "logits":
            # q = softmax(draft_logits) at draft temperature 1: the token probs are consistent with the logits.
            kw.update(draft_token_probs=q.gather(-1, drafts[..., None].long())[..., 0], draft_logits=draft_logits,
                      draft_temperature=torch.ones(R, device=DEVICE))
        return tuple(dk.rejection_sample(target.to(LOW), drafts, probs, lengths, cu, c["temperature"], c["seed"],
                                         c["offset"], **kw, backend=backend))
    return call


# (name, op module, call(backend) -> tensor or tuple of tensors, low precision inputs? or "fast": checked for
# self-consistency instead of equality with the reference)
VARIANTS: list[tuple[str, object, Callable, object]] = [  # low: True/False, or "fast"
    ("philox_uniform", pu_op, philox, False),
    ("markov_draft vanilla fp32", md_op, markov("vanilla", torch.float32), False),
    ("markov_draft gated+conf fp32", md_op, markov("gated", torch.float32), False),
    ("markov_draft rnn+conf fp32", md_op, markov("rnn", torch.float32), False),
    *([("markov_draft gated+conf bf16", md_op, markov("gated", LOW), True)] if LOW != torch.float32 else []),
    # The fast path (tensor cores, fused head): not bitwise the reference, checked for self-consistency.
    ("markov_draft fast vanilla", md_op, markov("vanilla", LOW, exact=False), "fast"),
    ("markov_draft fast gated+conf", md_op, markov("gated", LOW, exact=False), "fast"),
    ("markov_draft fast rnn+conf", md_op, markov("rnn", LOW, exact=False), "fast"),
    ("schedule_verify causal", sv_op, schedule("causal"), False),
    ("schedule_verify async", sv_op, schedule("async"), False),
    ("pack_verify", pv_op, pack, False),
    ("pack_verify bucket+pages", pv_op, pack_bucket, False),
    ("append_verify_kv", av_op, append_kv, False),  # a copy: exact in every dtype
    ("verify_attention chain", va_op, attention(False, LOW), LOW != torch.float32),
    ("verify_attention tree+window+softcap", va_op, attention(True, LOW), LOW != torch.float32),
    ("verify_attention bad metadata (unchecked)", va_op, attention_bad_metadata, LOW != torch.float32),
    ("rejection_sample onehot", rs_op, rejection("onehot", False), False),
    ("rejection_sample probs", rs_op, rejection("probs", False), False),
    ("rejection_sample logits", rs_op, rejection("logits", False), False),
    ("rejection_sample probs top-k/top-p", rs_op, rejection("probs", True), False),
    ("rejection_sample logits top-k/top-p", rs_op, rejection("logits", True), False),
    ("advance", adv_op, advance, False),
]


def tree_rejection(mode: str, filters: bool):
    """tree_rejection_sample: 5 requests of 9-node trees (3 root children, 2 below two of them, a chain
    below), one inactive-size request (0 nodes), greedy rows, peaked targets so walks go deep and later
    siblings are tried; V = 1001."""
    def call(backend):
        from dspark_kernels.ops.tree_rejection_sample import first_children

        g = _gen(7)
        N = 9
        parents = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 3, 7], device=DEVICE).expand(R, N).contiguous()
        num_nodes = torch.tensor([N, 0, 5, N, 7], dtype=torch.int32, device=DEVICE)
        cu = torch.zeros(R + 1, dtype=torch.int32, device=DEVICE)
        cu[1:] = torch.cumsum(num_nodes + 1, 0)
        T = R * (N + 1)
        tokens = torch.randint(0, V_ODD, (R, N), generator=g, device=DEVICE, dtype=torch.int32)
        target = _randn(T, V_ODD, g=g, scale=2.0)
        # Row of node v peaks at its second child's token (the first child is usually rejected).
        for v, c in ((-1, 1), (0, 4), (1, 6), (3, 7), (7, 8)):
            target[cu[:-1].long() + 1 + v, tokens[:, c].long()] += 6.0
        q = torch.softmax(_randn(R, N, V_ODD, g=g, scale=2.0), -1)
        live = torch.ones(R, N, dtype=torch.bool, device=DEVICE)
        q = q[torch.arange(R, device=DEVICE)[:, None], first_children(parents, live)]
        c = _common(g)
        kw = dict(top_k=torch.tensor([0, 7, 50, V_ODD + 5, 1], dtype=torch.int32, device=DEVICE),
                  top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0], device=DEVICE)) if filters else {}
        return tuple(dk.tree_rejection_sample(target.to(LOW), tokens, parents, num_nodes, cu, c["temperature"],
                                              c["seed"], c["offset"], draft_probs=q if mode == "probs" else None,
                                              **kw, backend=backend))
    return call


from dspark_kernels.ops import tree_rejection_sample as trs_op  # noqa: E402

VARIANTS += [
    ("tree_rejection_sample onehot", trs_op, tree_rejection("onehot", False), False),
    ("tree_rejection_sample probs", trs_op, tree_rejection("probs", False), False),
    ("tree_rejection_sample probs top-k/top-p", trs_op, tree_rejection("probs", True), False),
]

def tree_layout(backend):
    """tree_verify_layout: 5 requests of up to 40 nodes (two mask words), one inactive, a bucket with padding."""
    from bench.bench_tree_verify_layout import random_parents_tensor

    g = _gen(8)
    N = 40
    parents = random_parents_tensor(R, N, g).to(DEVICE)
    num_nodes = torch.tensor([N, 0, 17, N, 3], dtype=torch.int32, device=DEVICE)
    sizes = num_nodes + 1
    sizes[1] = 0  # inactive
    cu = torch.zeros(R + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.cumsum(sizes, 0)
    start = torch.tensor([0, 5, 99, 2**20, 7], dtype=torch.int32, device=DEVICE)
    return tuple(dk.tree_verify_layout(parents, num_nodes, start, cu_verify=cu, num_rows=int(cu[-1]) + 9,
                                       backend=backend))


def compact_kv(backend):
    """compact_accepted_kv: bf16 on a GPU, pages of 5 scattered, D = 80, root paths that skip nodes."""
    g = _gen(9)
    heads, dim, page_size, N = 3, 80, 5, 12
    per = 6
    page_table = torch.randperm(R * per + 1, generator=g, device=DEVICE)[: R * per].reshape(R, per).to(torch.int32)
    k = _randn(R * per + 1, page_size, heads, dim, g=g, dtype=LOW)
    v = _randn(R * per + 1, page_size, heads, dim, g=g, dtype=LOW)
    nodes = torch.tensor([[1, 3, 4, 8, 11], [0, 1, 2, 3, 4], [2, 5, -1, -1, -1], [0, 4, 6, 7, -1], [-1] * 5],
                         dtype=torch.int32, device=DEVICE)
    nodes = torch.cat([nodes, torch.full((R, N - 5), -1, dtype=torch.int32, device=DEVICE)], 1)
    dk.compact_accepted_kv(k, v, page_table, torch.tensor([3, 0, 11, 9, 4], dtype=torch.int32, device=DEVICE), nodes,
                           torch.tensor([5, 5, 2, 4, 0], dtype=torch.int32, device=DEVICE), backend=backend)
    return k, v


from dspark_kernels.ops import compact_accepted_kv as cak_op  # noqa: E402
from dspark_kernels.ops import tree_verify_layout as tvl_op  # noqa: E402

VARIANTS += [
    ("tree_verify_layout", tvl_op, tree_layout, False),
    ("compact_accepted_kv", cak_op, compact_kv, False),  # a copy: exact in every dtype
]


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def compare(got, ref, low: bool) -> str | None:
    """None when got equals ref (ints exactly, floats within tolerance), else what differs."""
    got, ref = _as_tuple(got), _as_tuple(ref)
    if len(got) != len(ref):
        return f"{len(got)} outputs, reference has {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            if not torch.equal(a.cpu(), b.cpu()):
                return f"output {i}: {(a != b).sum().item()} of {a.numel()} integers differ"
            continue
        a64, b64 = a.double().cpu(), b.double().cpu()
        if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return f"output {i}: non-finite values differ"
        fin = torch.isfinite(b64)
        scale = max(b64[fin].abs().max().item() if fin.any() else 0.0, 1e-30)
        err = (a64[fin] - b64[fin]).abs().max().item() / scale if fin.any() else 0.0
        if err > (3e-2 if low else 1e-4):
            return f"output {i}: max error {err:.2e} relative to the largest value"
    return None


def consistent_draft(out) -> str | None:
    """markov_draft's fast path: each token and its reported probabilities come from the reported logits."""
    tokens, token_probs, draft_probs, draft_logits = out[0], out[1], out[-2], out[-1]  # (conf, survival) between
    temperature = _common(None)["temperature"]
    greedy = temperature < 1e-5
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)
    law = torch.softmax(draft_logits.double() * inv_t[:, None, None].double(), -1)
    x = tokens.long()
    if bool(((x < 0) | (x >= draft_logits.shape[-1])).any()):
        return "token ids outside [0, V)"
    p = law.gather(-1, x[..., None])[..., 0]
    err = (token_probs.double() - p)[~greedy].abs().max().item() if bool((~greedy).any()) else 0.0
    if err > 1e-5:
        return f"token_probs differ from softmax(draft_logits / T) at the token by {err:.2e}"
    err = (draft_probs.double() - law)[~greedy].abs().max().item() if bool((~greedy).any()) else 0.0
    if err > 1e-5:
        return f"draft_probs differ from softmax(draft_logits / T) by {err:.2e}"
    if not torch.equal(x[greedy], draft_logits[greedy].argmax(-1)):
        return "greedy rows are not the argmax of their logits"
    return None


def main() -> int:
    dk.set_value_checks(False)  # the unchecked fast path, on every device: what an engine runs
    print(f"device {DEVICE}; Triton interpreted: {os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')}",
          flush=True)
    failures = ran = 0
    for name, module, call, low in VARIANTS:
        backends = [b for b in module.IMPLS.available(DEVICE.type) if b != "reference"]
        if not backends:
            print(f"{name:42s} -        no compiled backend here", flush=True)
            continue
        try:
            ref = call("reference")
        except Exception:
            print(f"{name:42s} reference FAILED\n{traceback.format_exc()}", flush=True)
            failures += 1
            continue
        for backend in backends:
            try:
                out = call(backend)
                if DEVICE.type == "cuda":
                    torch.cuda.synchronize()
                diff = consistent_draft(out) if low == "fast" else compare(out, ref, low)
            except Exception:
                diff = "raised\n" + traceback.format_exc()
            ran += 1
            failures += diff is not None
            print(f"{name:42s} {backend:8s} {'ok' if diff is None else 'FAILED: ' + diff}", flush=True)
    print(f"{ran} kernel calls, {failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
