"""Benchmark verify_attention against its floor and its peers.

Cases: R requests in {1, 16, 64, 256} x context in {512, 4096, 32768}, verify
lengths n_r cycling through 8, 2, 16, 6 (mixed in every batch; R = 1 gets 8),
GQA 32 query / 8 kv heads x 128, bf16, paged KV (page size 16, pages in a
random order), causal chain inside the block (--tree: random trees, the same
mask for every provider that supports one).

Providers:
  reference-eager   dspark reference (per-request gather + fp32 softmax)
  triton            dspark Triton kernel (paged, split-KV, no host sync)
  flex              torch FlexAttention with a block mask over a padded batch
                    (compiled on CUDA, eager on CPU); KV gathered out of the pages
                    and the block mask built in prepare(), outside the timed region
  sdpa              torch SDPA with an explicit boolean mask over the same padded
                    batch (KV gather and mask outside the timed region)
  flashinfer-mask   FlashInfer batch prefill on the paged cache with a packed
                    custom mask (plan() outside the timed region); skipped with the
                    reason when flashinfer cannot be imported
  flashinfer-causal the same with causal=True (chain only: bottom-right causal is
                    exactly the chain rule)

Floor: K and V read once per request, bf16: bytes = sum(kv_len) * Hkv * D * 2 * 2
(q and out are < 1% and left out); FLOPs = 4 * sum(n_r * kv_len) * Hq * D. The
report adds achieved bandwidth (floor bytes / median time) and the largest
output error against reference-eager per provider. The peers that need a dense
copy of KV are skipped when that copy would exceed --dense-gb.

--quick: tiny fp32 shapes (R in {1, 3}, context 37, 8/2 heads x 16);
--smoke: the same shapes with R = 2 only, few calls, and on CPU Triton through
its interpreter (TRITON_INTERPRET=1 is set when triton is not yet imported).

Usage (from the repository root):
  python bench/bench_verify_attention.py --out bench/out/verify_attention.json
  python bench/bench_verify_attention.py --requests 64 --contexts 4096 --tree
  python bench/bench_verify_attention.py --smoke --device cpu --out /tmp/va.json
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness as H  # noqa: E402
from dspark_kernels.ops import verify_attention as op  # noqa: E402
from dspark_kernels.reference.verify_attention import tree_bits  # noqa: E402

OP = "verify_attention"
# tests/test_bench.py: extra --smoke arguments, the shape keys of every case, and the providers that must
# run everywhere (the rest need CUDA or the Triton interpreter, which refuses nothing here but bf16).
SMOKE_TEST = ([], ("R", "context", "hq", "hkv", "head_dim", "page_size", "dtype"))
SMOKE_MUST_RUN = ("reference-eager", "sdpa")
PATTERN = (8, 2, 16, 6)


def _lengths(num_req: int) -> list[int]:
    return [PATTERN[r % len(PATTERN)] for r in range(num_req)]


def _tree_words(ns: list[int], gen: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
    """Random topological trees: row t = bits of t's ancestors and itself (two int32 words)."""
    rows, parents = [], []
    for n in ns:
        par = [-1] + [int(torch.randint(0, t, (1,), generator=gen)) for t in range(1, n)]
        parents.append(par)
        for t in range(n):
            bits, j = 0, t
            while j >= 0:
                bits |= 1 << j
                j = par[j]
            rows.append([(bits >> 32 * w) & 0xFFFFFFFF for w in range(2)])
    words = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, parents


def make_case(num_req, context, *, hq, hkv, dim, page_size, dtype, device, tree, seed=0) -> H.Case:
    ns = _lengths(num_req)
    kv_lens = [context + n for n in ns]
    pages = [math.ceil(L / page_size) for L in kv_lens]
    total_kv = sum(kv_lens)
    floor_bytes = total_kv * hkv * dim * 2 * 2  # bf16 K and V, read once
    floor_flops = 4 * sum(n * L for n, L in zip(ns, kv_lens)) * hq * dim

    def make_inputs() -> dict:
        gen = torch.Generator().manual_seed(seed)
        num_pages = sum(pages)
        perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
        page_table = torch.zeros((num_req, max(pages)), dtype=torch.int32)
        start = 0
        for r, p in enumerate(pages):
            page_table[r, :p] = perm[start: start + p]
            start += p
        cu = [0]
        for n in ns:
            cu.append(cu[-1] + n)
        dev_gen = torch.Generator(device=device).manual_seed(seed)
        shape = (num_pages, page_size, hkv, dim)
        inputs = dict(
            q=torch.randn((cu[-1], hq, dim), generator=dev_gen, device=device, dtype=dtype),
            k_cache=torch.randn(shape, generator=dev_gen, device=device, dtype=dtype),
            v_cache=torch.randn(shape, generator=dev_gen, device=device, dtype=dtype),
            page_table=page_table.to(device),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
            cu_verify=torch.tensor(cu, dtype=torch.int32, device=device),
            tree_mask=None,
        )
        if tree:
            words, parents = _tree_words(ns, gen)
            inputs["tree_mask"] = words.to(device)
        return inputs

    kv_bytes = sum(pages) * page_size * hkv * dim * torch.finfo(dtype).bits // 8 * 2
    return H.Case(
        op=OP,
        name=f"R={num_req} ctx={context} n={'/'.join(map(str, sorted(set(ns))))}{' tree' if tree else ''}",
        params=dict(R=num_req, context=context, n=ns[:8], hq=hq, hkv=hkv, head_dim=dim, page_size=page_size,
                    dtype=str(dtype).replace("torch.", ""), tree=tree, total_kv=total_kv),
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=floor_flops,
        resident_bytes=kv_bytes,
        floor_note="K and V read once per request at bf16 (q/out ignored)",
    )


# --------------------------------------------------------------------------- dense layout for the torch peers


def _block_masks(inputs: dict) -> tuple[torch.Tensor, list[int], list[int]]:
    """Per-request visibility [R, n_max, L_max] bool (chain or tree), and n / kv_len lists."""
    cu = inputs["cu_verify"].tolist()
    lens = inputs["kv_lens"].tolist()
    ns = [cu[r + 1] - cu[r] for r in range(len(lens))]
    n_max, l_max = max(ns), max(lens)
    dev = inputs["q"].device
    mask = torch.zeros((len(lens), n_max, l_max), dtype=torch.bool, device=dev)
    tree = inputs["tree_mask"]
    for r, (n, L) in enumerate(zip(ns, lens)):
        ctx = L - n
        mask[r, :n, :ctx] = True
        if tree is None:
            mask[r, :n, ctx:L] = torch.tril(torch.ones((n, n), dtype=torch.bool, device=dev))
        else:
            mask[r, :n, ctx:L] = tree_bits(tree[cu[r]: cu[r + 1]], n)
    return mask, ns, lens


def _dense_kv(inputs: dict, l_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, Hkv, L_max, D] copies of K and V gathered through the page table."""
    kc, vc, pt = inputs["k_cache"], inputs["v_cache"], inputs["page_table"].long()
    page_size = kc.shape[1]
    pos = torch.arange(l_max, device=kc.device)
    pages = pt[:, (pos // page_size).clamp(max=pt.shape[1] - 1)]
    slots = pos % page_size
    k = kc[pages, slots[None, :]].permute(0, 2, 1, 3).contiguous()
    v = vc[pages, slots[None, :]].permute(0, 2, 1, 3).contiguous()
    return k, v


def _padded_prepare(limit_bytes: float):
    def prepare(inputs: dict) -> dict:
        mask, ns, lens = _block_masks(inputs)
        num_req, n_max, l_max = mask.shape
        kc = inputs["k_cache"]
        need = 2 * num_req * l_max * kc.shape[2] * kc.shape[3] * kc.element_size()
        if need > limit_bytes:
            return {"skip": f"dense KV copy needs {need / 1e9:.1f} GB > --dense-gb {limit_bytes / 1e9:.1f}"}
        k, v = _dense_kv(inputs, l_max)
        cu = inputs["cu_verify"]
        rows = torch.cat([torch.arange(n, device=cu.device) + int(cu[r]) for r, n in enumerate(ns)])
        req = torch.repeat_interleave(torch.arange(num_req, device=cu.device), torch.tensor(ns, device=cu.device))
        local = rows - cu[:-1].long()[req]
        return dict(q=inputs["q"], k=k, v=v, mask=mask, req=req, local=local, n_max=n_max, ns=ns, lens=lens)

    return prepare


def _to_padded(p: dict) -> torch.Tensor:
    q = p["q"]
    padded = q.new_zeros((len(p["ns"]), p["n_max"], q.shape[1], q.shape[2]))
    padded[p["req"], p["local"]] = q
    return padded.transpose(1, 2)  # [R, Hq, n_max, D]


def _from_padded(out: torch.Tensor, p: dict) -> torch.Tensor:
    return out.transpose(1, 2)[p["req"], p["local"]]  # [T, Hq, D]


# --------------------------------------------------------------------------- providers


def provider_ours(backend: str) -> H.Provider:
    def factory(case):
        def fn(inp):
            return op.verify_attention(**inp, backend=backend)
        return fn
    name = H.REFERENCE_EAGER if backend == "reference" else backend
    return H.Provider(name=name, factory=factory)


def provider_sdpa(limit_bytes: float) -> H.Provider:
    import torch.nn.functional as F

    def factory(case):
        def fn(p):
            if "skip" in p:
                raise H.ProviderUnavailable(p["skip"])
            out = F.scaled_dot_product_attention(_to_padded(p), p["k"], p["v"], attn_mask=p["mask"][:, None],
                                                 enable_gqa=True)
            return _from_padded(out, p)
        return fn

    return H.Provider(name="sdpa", factory=factory, prepare=_padded_prepare(limit_bytes),
                      note="padded batch, explicit bool mask; KV gather and mask outside the timed region")


def provider_flex(limit_bytes: float, device: torch.device) -> H.Provider:
    def factory(case):
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as exc:
            raise H.ProviderUnavailable(f"FlexAttention not importable: {exc}") from exc
        attend = H.compiled(flex_attention) if device.type == "cuda" else flex_attention

        def fn(p):
            if "skip" in p:
                raise H.ProviderUnavailable(p["skip"])
            out = attend(_to_padded(p), p["k"], p["v"], block_mask=p["block_mask"], enable_gqa=True)
            return _from_padded(out, p)
        return fn

    base = _padded_prepare(limit_bytes)

    def prepare(inputs):
        p = base(inputs)
        if "skip" in p:
            return p
        from torch.nn.attention.flex_attention import create_block_mask

        mask = p["mask"]

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, q_idx, kv_idx]

        p["block_mask"] = create_block_mask(mask_mod, mask.shape[0], None, mask.shape[1], mask.shape[2],
                                            device=str(mask.device))
        return p

    return H.Provider(name="flex", factory=factory, prepare=prepare,
                      note="padded batch, block mask from the dense mask (built outside the timed region)"
                      + ("" if device.type == "cuda" else "; eager on CPU"))


def provider_flashinfer(causal: bool) -> H.Provider:
    def factory(case):
        try:
            import flashinfer
        except Exception as exc:  # ImportError or a JIT/toolchain failure at import
            raise H.ProviderUnavailable(f"flashinfer not importable: {type(exc).__name__}: {exc}") from exc
        if case.params["tree"] and causal:
            raise H.ProviderUnavailable("causal=True cannot express a tree")

        def fn(p):
            return p["wrapper"].run(p["q"], (p["k_cache"], p["v_cache"]))
        return fn

    def prepare(inputs):
        try:
            import flashinfer
        except Exception:
            return inputs  # factory reports the skip
        mask, ns, lens = _block_masks(inputs)
        dev = inputs["q"].device
        page_size = inputs["k_cache"].shape[1]
        pages = [math.ceil(L / page_size) for L in lens]
        indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0).tolist()), dtype=torch.int32, device=dev)
        indices = torch.cat([inputs["page_table"][r, :p] for r, p in enumerate(pages)]).to(torch.int32)
        last = torch.tensor([L - (p - 1) * page_size for L, p in zip(lens, pages)], dtype=torch.int32, device=dev)
        workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
        kw = dict(causal=True) if causal else dict(
            custom_mask=torch.cat([mask[r, :n, :L].reshape(-1) for r, (n, L) in enumerate(zip(ns, lens))]))
        hq, dim = inputs["q"].shape[1:]
        wrapper.plan(inputs["cu_verify"], indptr, indices, last, hq, inputs["k_cache"].shape[2], dim, page_size,
                     q_data_type=inputs["q"].dtype, kv_data_type=inputs["k_cache"].dtype, **kw)
        return dict(wrapper=wrapper, q=inputs["q"], k_cache=inputs["k_cache"], v_cache=inputs["v_cache"])

    name = "flashinfer-causal" if causal else "flashinfer-mask"
    note = ("paged prefill, causal=True" if causal else "paged prefill, packed custom mask") + \
        "; plan() outside the timed region"
    return H.Provider(name=name, factory=factory, prepare=prepare, note=note, external=True)


# --------------------------------------------------------------------------- accuracy and bandwidth


class _Recorder:
    """Wraps provider factories to keep each provider's first output of each case."""

    def __init__(self):
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}

    def wrap(self, provider: H.Provider) -> H.Provider:
        factory = provider.factory

        def recording_factory(case):
            fn = factory(case)
            seen = {"first": True}

            def wrapped(inp):
                out = fn(inp)
                if seen["first"]:
                    seen["first"] = False
                    self.outputs[(case.name, provider.name)] = out.detach().float().cpu()
                return out
            return wrapped

        return H.Provider(name=provider.name, factory=recording_factory, note=provider.note,
                          comparable=provider.comparable, prepare=provider.prepare, external=provider.external)


def annotate(report: dict, recorder: _Recorder) -> None:
    """Adds achieved bandwidth and the max error against reference-eager to every ok record."""
    for case in report["cases"]:
        ref = recorder.outputs.get((case["name"], H.REFERENCE_EAGER))
        for name, rec in case["providers"].items():
            if rec.get("status") != "ok":
                continue
            rec["achieved_bytes_per_s"] = case["floor_bytes"] / (rec["median_us"] * 1e-6)
            out = recorder.outputs.get((case["name"], name))
            if ref is not None and out is not None and out.shape == ref.shape:
                rec["max_abs_err_vs_reference"] = float((out - ref).abs().max()) if out.numel() else 0.0
            else:
                rec["max_abs_err_vs_reference"] = None


def bandwidth_table(report: dict) -> str:
    lines = ["achieved bandwidth (floor bytes / median) and accuracy vs reference-eager:",
             f"{'case':<34} {'provider':<18} {'GB/s':>8} {'%floor':>7} {'max|err|':>9}"]
    for case in report["cases"]:
        for name, rec in case["providers"].items():
            if rec.get("status") != "ok":
                continue
            err = rec.get("max_abs_err_vs_reference")
            lines.append(f"{case['name']:<34} {name:<18} {rec['achieved_bytes_per_s'] / 1e9:>8.1f} "
                         f"{rec['percent_of_floor']:>7.1f} {'-' if err is None else f'{err:.2e}':>9}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = H.common_parser(__doc__)
    p.add_argument("--requests", type=H.int_list, help="comma list of R (default 1,16,64,256)")
    p.add_argument("--contexts", type=H.int_list, help="comma list of context lengths (default 512,4096,32768)")
    p.add_argument("--tree", action="store_true", help="random trees instead of chains")
    p.add_argument("--dense-gb", type=float, default=16.0,
                   help="skip the padded peers (sdpa, flex) when their dense KV copy exceeds this (default 16)")
    args = p.parse_args(argv)
    cfg = H.run_config(args, extra_meta={"tree": args.tree})
    device = cfg.device
    if args.smoke or args.quick:
        requests = args.requests or ([2] if args.smoke else [1, 3])
        contexts = args.contexts or [37]
        shape = dict(hq=8, hkv=2, dim=16, page_size=16, dtype=torch.float32)
    else:
        requests, contexts = args.requests or [1, 16, 64, 256], args.contexts or [512, 4096, 32768]
        shape = dict(hq=32, hkv=8, dim=128, page_size=16, dtype=torch.bfloat16)
    cases = [make_case(r, c, device=device, tree=args.tree, **shape) for r in requests for c in contexts]
    limit = args.dense_gb * 1e9
    providers = [provider_ours("reference"), provider_ours("triton"), provider_flex(limit, device),
                 provider_sdpa(limit), provider_flashinfer(False), provider_flashinfer(True)]
    providers = H.select_providers(providers, args.providers, args.exclude_providers)
    recorder = _Recorder()
    report = H.run_benchmark(OP, cases, [recorder.wrap(pr) for pr in providers], cfg)
    annotate(report, recorder)
    return H.finish(report, args, footer=bandwidth_table(report))


if __name__ == "__main__":
    sys.exit(H.exit_code(main()))
