"""Triton append_verify_kv: implements dspark_kernels.append_verify_kv; one program per (row block, head block).

Program (i, j) copies rows [i·BLOCK_T, (i+1)·BLOCK_T) and kv heads
[j·BLOCK_H, (j+1)·BLOCK_H) of key and value, a [BLOCK_T, BLOCK_H, BLOCK_D]
tile each, to their slots: slot s of a row goes to page s // S, offset s % S
(PAGE_SIZE is a constexpr, so for the usual power-of-two page sizes that is
a shift and a mask). D is the innermost, unit-stride axis of every tile, so
with contiguous heads (stride 1, specialised by Triton) the loads and stores
are 16-byte vectors. A row whose slot is outside [0, P·S) is masked out:
it reads nothing and writes nothing. Rows sharing a slot race (unspecified
winner on a GPU; the interpreter runs programs and lanes in order, so the
last row wins there, as in the reference).

Tile: about 4096 elements per tensor per program (8 KB at bf16): at Hkv = 8,
D = 128 that is 4 rows x 8 heads x 128, so 512 verify rows are 128 programs,
one wave on an H100's 132 SMs, and each thread moves 2 x 4 16-byte vectors
per tensor with 4 warps. The op is launch-bound at engine sizes: 512 rows x
8 x 128 x bf16 is 1 MB per tensor, read once and written once (~1.4 us at
3 TB/s for k and v together).
"""

import triton
import triton.language as tl

TILE_ELEMENTS = 4096


@triton.jit
def _append_kv_kernel(
    key_ptr, value_ptr, k_ptr, v_ptr, slot_ptr,
    num_rows, num_heads, head_dim, num_slots,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcp, stride_kcs, stride_kch, stride_kcd, stride_vcp, stride_vcs, stride_vch, stride_vcd,
    stride_slot,
    PAGE_SIZE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < num_rows
    t64 = t.to(tl.int64)
    slot = tl.load(slot_ptr + t64 * stride_slot, mask=t_ok, other=-1).to(tl.int64)
    ok = t_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE

    # EVEN_D (D a power of two): no mask along D, so the mask is constant over each row of D and the
    # loads / stores can be 16-byte vectors (with a runtime D < BLOCK_D they would be scalar).
    mask = ok[:, None, None] & (h < num_heads)[None, :, None]
    if not EVEN_D:
        mask = mask & (d < head_dim)[None, None, :]
    h64 = h.to(tl.int64)[None, :, None]
    d64 = d.to(tl.int64)[None, None, :]
    row = t64[:, None, None]
    x = tl.load(key_ptr + row * stride_kt + h64 * stride_kh + d64 * stride_kd, mask=mask)
    y = tl.load(value_ptr + row * stride_vt + h64 * stride_vh + d64 * stride_vd, mask=mask)
    k_dst = (page * stride_kcp + offset * stride_kcs)[:, None, None] + h64 * stride_kch + d64 * stride_kcd
    v_dst = (page * stride_vcp + offset * stride_vcs)[:, None, None] + h64 * stride_vch + d64 * stride_vcd
    tl.store(k_ptr + k_dst, x, mask=mask)
    tl.store(v_ptr + v_dst, y, mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def launch_config(num_rows: int, num_heads: int, head_dim: int) -> dict:
    """Tile sizes from shapes: all of D, heads up to the tile budget, then rows."""
    block_d = _next_pow2(head_dim)
    block_h = min(_next_pow2(num_heads), max(1, TILE_ELEMENTS // block_d))
    block_t = min(_next_pow2(num_rows), max(1, TILE_ELEMENTS // (block_d * block_h)))
    return dict(EVEN_D=block_d == head_dim, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)


def append_verify_kv(a):
    """Implements dspark_kernels.append_verify_kv (in place; reads no tensor value on the host)."""
    key, value, k_cache, v_cache, slot_mapping = a.key, a.value, a.k_cache, a.v_cache, a.slot_mapping
    num_rows, num_heads, head_dim = key.shape
    num_pages, page_size = k_cache.shape[:2]
    if num_rows == 0 or num_heads == 0 or head_dim == 0 or num_pages == 0:
        return None
    cfg = launch_config(num_rows, num_heads, head_dim)
    grid = (triton.cdiv(num_rows, cfg["BLOCK_T"]), triton.cdiv(num_heads, cfg["BLOCK_H"]))
    _append_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, num_rows, num_heads, head_dim, num_pages * page_size,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0),
        PAGE_SIZE=page_size, **cfg)
    return None


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    names = ("key_ptr value_ptr k_ptr v_ptr slot_ptr num_rows num_heads head_dim num_slots stride_kt stride_kh "
             "stride_kd stride_vt stride_vh stride_vd stride_kcp stride_kcs stride_kch stride_kcd stride_vcp "
             "stride_vcs stride_vch stride_vcd stride_slot").split()
    specs = []
    # (dtype, slot dtype, page size, rows, kv heads, head dim): the engine's bf16 / 16-slot pages at
    # Hkv = 8, D = 128; fp16 with 1-slot pages and D = 256; fp32 with an odd page size and head count.
    for dtype, slot_dtype, page_size, rows, heads, dim in (("bf16", "i64", 16, 512, 8, 128),
                                                           ("fp16", "i32", 1, 64, 1, 256),
                                                           ("fp32", "i64", 5, 40, 3, 80)):
        sig = {k: "i32" for k in names}
        sig.update(key_ptr=f"*{dtype}", value_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}",
                   slot_ptr=f"*{slot_dtype}", stride_kcp="i64", stride_vcp="i64")
        # Unit head-dim strides, as Triton specialises them at launch (the vector loads depend on it).
        for k in ("stride_kd", "stride_vd", "stride_kcd", "stride_vcd", "stride_slot"):
            sig[k] = "constexpr"
        const = dict(stride_kd=1, stride_vd=1, stride_kcd=1, stride_vcd=1, stride_slot=1, PAGE_SIZE=page_size,
                     **launch_config(rows, heads, dim))
        sig.update({k: "constexpr" for k in const})
        # What the launcher specialises for contiguous tensors: aligned pointers, and the row / head /
        # page strides and sizes that are multiples of 16 at these shapes (D = 80: head strides of 80).
        sizes = dict(num_rows=rows, num_heads=heads, head_dim=dim, num_slots=16 * page_size * rows,
                     stride_kt=heads * dim, stride_kh=dim, stride_vt=heads * dim, stride_vh=dim,
                     stride_kcp=page_size * heads * dim, stride_kcs=heads * dim, stride_kch=dim,
                     stride_vcp=page_size * heads * dim, stride_vcs=heads * dim, stride_vch=dim)
        aligned = ("key_ptr", "value_ptr", "k_ptr", "v_ptr", "slot_ptr")
        aligned += tuple(k for k, n in sizes.items() if n % 16 == 0)
        specs.append((_append_kv_kernel, sig, const, {"divisible_by_16": aligned}))
    return specs
