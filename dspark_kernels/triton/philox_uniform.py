"""Triton philox_uniform: implements dspark_kernels.philox_uniform, one program per (request, block of BLOCK outputs)."""

import torch
import triton
import triton.language as tl

from . import rng


@triton.jit
def _philox_uniform_kernel(seed_ptr, offset_ptr, out_ptr, n, position, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr)
    u = rng.uniform(seed, offset, STREAM, position, idx)
    tl.store(out_ptr + row.to(tl.int64) * n + idx, u, mask=idx < n)


def philox_uniform(a) -> torch.Tensor:
    rows = a.seed.shape[0]
    out = torch.empty((rows, a.n), dtype=torch.float32, device=a.seed.device)
    if rows == 0 or a.n == 0:
        return out
    block = 1024
    grid = (rows, triton.cdiv(a.n, block))
    _philox_uniform_kernel[grid](a.seed.contiguous(), a.offset.reshape(1), out, a.n, a.position, STREAM=a.stream,
                                 BLOCK=block)
    return out


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    sig = {"seed_ptr": "*i64", "offset_ptr": "*i64", "out_ptr": "*fp32", "n": "i64", "position": "i32",
           "STREAM": "constexpr", "BLOCK": "constexpr"}
    return [(_philox_uniform_kernel, sig, {"STREAM": 3, "BLOCK": 1024})]
