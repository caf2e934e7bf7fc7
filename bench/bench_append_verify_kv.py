"""Benchmark dspark_kernels.append_verify_kv: writing the verify rows' K/V into the paged cache.

Cases: R in {8, 64, 256} requests x γ in {7} drafts, T = R·(γ+1) verify rows,
8 kv heads x 128 (bf16; fp32 tiny shapes with --smoke / --quick), pages of 16
slots. Each request owns PAGES_PER_REQUEST pages (256 positions) handed out in
a random order, starts at a random position and writes its γ + 1 rows there:
the slot mapping pack_verify produces (vLLM's slot_mapping layout). The cache
holds only those pages (the cost does not depend on the cache size, and a
small cache keeps the rotated input copies affordable).

Floor: bytes moved at HBM bandwidth: key and value read once (2 · T · Hkv · D ·
element size), the slot mapping read (T · 8), the same K/V bytes written once
into the cache; no FLOPs. At R = 64, bf16: 2 · 512 · 8 · 128 · 2 B read + as
much written = 4.2 MB -> 1.4 us on an H100, so a launch (~2-3 us eager, ~1 us
in a CUDA graph) bounds it: the number that matters is that it is one launch.

Providers:
  reference-eager     dspark_kernels.append_verify_kv(..., backend="reference")
                      (deterministic: duplicate slots resolved by a sort, one index_put_ per cache)
  reference-compiled  torch.compile of the reference implementation function
  triton              backend="triton" (one program per row block x head block)
  torch-index-put     the plain scatter an engine writes without the op,
                      k_cache[page, offset] = key with page / offset precomputed
                      outside the timed region (no out-of-range skip, no duplicate rule)
  flashinfer-append   flashinfer.page.append_paged_kv_cache (external peer: batch
                      indices, positions and the page table's CSR form prepared
                      outside the timed region); "unavailable" when not importable
  The op returns nothing, so no tokens are compared; tests/test_append_verify_kv.py
  checks every backend against a Python scatter.

Usage (from the repository root):
  python -m bench.bench_append_verify_kv --out bench/out/append_verify_kv.json
  python -m bench.bench_append_verify_kv --R 64 --providers triton,torch-index-put
  python -m bench.bench_append_verify_kv --smoke --device cpu --out /tmp/append.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "append_verify_kv"
# tests/test_bench.py: extra --smoke arguments, and the shape keys every case's params must hold.
SMOKE_TEST = ([], ("R", "gamma", "rows", "hkv", "head_dim", "page_size", "dtype"))
FULL_R = [8, 64, 256]
FULL_GAMMA = [7]
QUICK_R = [2, 5]
QUICK_GAMMA = [3]
SMOKE_R = [2]
SMOKE_GAMMA = [3]
PAGES_PER_REQUEST = 16


def make_case(R: int, gamma: int, *, hkv: int, dim: int, page_size: int, dtype: torch.dtype,
              device: torch.device) -> harness.Case:
    rows = R * (gamma + 1)
    elt = torch.finfo(dtype).bits // 8
    kv_bytes = rows * hkv * dim * elt
    floor_bytes = 2 * kv_bytes + rows * 8 + 2 * kv_bytes  # read key, value, slots; write k, v

    def make_inputs() -> dict:
        g = torch.Generator().manual_seed(1000 * R + gamma)
        pages = R * PAGES_PER_REQUEST
        table = torch.randperm(pages, generator=g).reshape(R, PAGES_PER_REQUEST)
        start = torch.randint(0, PAGES_PER_REQUEST * page_size - gamma, (R,), generator=g)
        pos = start[:, None] + torch.arange(gamma + 1)
        slot = (table.gather(1, pos // page_size) * page_size + pos % page_size).reshape(-1)
        shape = (pages, page_size, hkv, dim)
        return {
            "key": torch.randn(rows, hkv, dim, generator=g).to(device=device, dtype=dtype),
            "value": torch.randn(rows, hkv, dim, generator=g).to(device=device, dtype=dtype),
            "k_cache": torch.zeros(shape, device=device, dtype=dtype),
            "v_cache": torch.zeros(shape, device=device, dtype=dtype),
            "slot_mapping": slot.to(device),
            # for the peers, prepared outside the timed region
            "page": (slot // page_size).to(device), "offset": (slot % page_size).to(device),
            "row_request": torch.arange(R).repeat_interleave(gamma + 1).to(device=device, dtype=torch.int32),
            "positions": pos.reshape(-1).to(device=device, dtype=torch.int32),
            "page_table": table.to(device=device, dtype=torch.int32),
        }

    return harness.Case(
        op=OP,
        name=f"R={R} g={gamma} T={rows}",
        params={"R": R, "gamma": gamma, "rows": rows, "hkv": hkv, "head_dim": dim, "page_size": page_size,
                "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                "pages_per_request": PAGES_PER_REQUEST},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=0,
        resident_bytes=floor_bytes,
        floor_note="key + value + slot_mapping read once, the same K/V bytes written once, at HBM bandwidth; "
                   "one launch (a few us) is the practical bound at engine sizes",
    )


def _args(x: dict) -> tuple:
    return x["key"], x["value"], x["k_cache"], x["v_cache"], x["slot_mapping"]


def _public_call(backend: str):
    def call(x: dict, backend: str, case: harness.Case):
        import dspark_kernels as dk

        dk.append_verify_kv(*_args(x), backend=backend)
        return x["k_cache"]

    return harness.public_op_provider(OP, backend, call)


def _compiled_reference(case: harness.Case):
    from dspark_kernels.ops.append_verify_kv import OP as op

    fn = harness.compiled(op.impls.reference)

    def call(x: dict):
        fn(op.record(**dict(zip(op.Args._fields, _args(x)))))
        return x["k_cache"]

    return call


def _index_put(case: harness.Case):
    def call(x: dict):
        x["k_cache"][x["page"], x["offset"]] = x["key"]
        x["v_cache"][x["page"], x["offset"]] = x["value"]
        return x["k_cache"]

    return call


def _flashinfer(case: harness.Case):
    if case.params["device"] != "cuda":
        raise harness.ProviderUnavailable("flashinfer needs a CUDA device")
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        raise harness.ProviderUnavailable(f"flashinfer not importable: {type(exc).__name__}: {exc}") from exc

    def call(p: dict):
        import flashinfer

        flashinfer.page.append_paged_kv_cache(p["key"], p["value"], p["batch_indices"], p["positions"],
                                              (p["k_cache"], p["v_cache"]), p["kv_indices"], p["kv_indptr"],
                                              p["kv_last_page_len"], kv_layout="NHD")
        return p["k_cache"]

    return call


def _flashinfer_prepare(x: dict) -> dict:
    """The CSR page table FlashInfer reads: every page of every request, the last one full."""
    R, width = x["page_table"].shape
    page_size = x["k_cache"].shape[1]
    dev = x["page_table"].device
    return dict(x, batch_indices=x["row_request"], kv_indices=x["page_table"].reshape(-1),
                kv_indptr=torch.arange(R + 1, device=dev, dtype=torch.int32) * width,
                kv_last_page_len=torch.full((R,), page_size, device=dev, dtype=torch.int32))


def providers() -> list[harness.Provider]:
    return [
        harness.Provider(harness.REFERENCE_EAGER, _public_call("reference"),
                         note='dspark_kernels.append_verify_kv(backend="reference")'),
        harness.Provider("reference-compiled", _compiled_reference,
                         note="torch.compile(dspark_kernels.reference.append_verify_kv.append_verify_kv)"),
        harness.Provider("triton", _public_call("triton"), note='backend="triton"'),
        harness.Provider("torch-index-put", _index_put,
                         note="k_cache[page, offset] = key (page / offset precomputed): the plain scatter"),
        harness.Provider("flashinfer-append", _flashinfer, prepare=_flashinfer_prepare, external=True,
                         note="flashinfer.page.append_paged_kv_cache, NHD, CSR page table prepared outside"),
    ]


def parser():
    p = harness.r_gamma_parser(__doc__, FULL_R, FULL_GAMMA)
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    if args.smoke or args.quick:
        shape = dict(hkv=2, dim=16, page_size=16, dtype=torch.float32)
    else:
        shape = dict(hkv=8, dim=128, page_size=16, dtype=torch.bfloat16)
    return [make_case(R, gamma, device=device, **shape) for gamma in gammas for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
