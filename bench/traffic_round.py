"""Traffic of the engine round's small kernels under the interpreter: advance, and verify_attention with a tree
block with and without a window. Run: python -m bench.traffic_round (CPU, ~1 min). bench/NOTES.md has the numbers."""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, "/work/shared/tools"); sys.path.insert(0, os.getcwd())
import traffic, torch
import dspark_kernels as dk
# advance: R = 256, gamma = 7, every optional input
R, G = 256, 7
g = torch.Generator().manual_seed(0)
i32 = dict(dtype=torch.int32)
gen = torch.randint(0, 100, (R,), generator=g, **i32); start = torch.randint(0, 4000, (R,), generator=g, **i32)
x = dict(tokens=torch.randint(0, 151936, (R, G + 1), generator=g, **i32),
         num_accepted=torch.randint(0, G + 1, (R,), generator=g, **i32), anchor=torch.randint(0, 151936, (R,), generator=g, **i32),
         start_pos=start, num_generated=gen, active=torch.rand(R, generator=g) < 0.9, offset=torch.tensor(3),
         eos_token_ids=torch.tensor([2], **i32), max_new_tokens=gen + 64, max_positions=start + 512)
floor = R * (G + 1) * 4 + 6 * R * 4 + R + 8 + 4 + 5 * R * 4 + 2 * R + 8
with traffic.Counter() as c:
    dk.advance(**x, backend="triton")
print(f"advance R={R} g={G}: floor {floor} B, requested {c.requested} ({c.requested/floor:.3f}x), unique {c.unique} ({c.unique/floor:.3f}x), launches {c.launches}")
# verify_attention, tree + window, 4 requests of 1 + 8 nodes (3 chains glued at the anchor), context 200, 2 kv heads x 64, fp32
from bench import bench_verify_attention as bva
case = bva.make_case(4, 200, hq=8, hkv=2, dim=64, page_size=16, dtype=torch.float32, device=torch.device("cpu"), tree=True)
xa = case.make_inputs()
for w in (-1, 64):
    with traffic.Counter() as c:
        dk.verify_attention(**xa, window=w, backend="triton")
    print(f"verify_attention tree window={w}: requested {c.requested}, unique {c.unique}, launches {c.launches}")
