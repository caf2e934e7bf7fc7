"""Measure the serving simulator's SPS table on this GPU: a dense target's layers, timed for every batch.

    python -m bench.sps_profile --out sps.json                    # llama3-8b shapes on the local GPU
    python -m bench.sps_profile --out sps.json --smoke            # tiny shapes, CPU (CI runs this)
    python -m bench.sps_profile --out sps.json --tiny             # tiny shapes on the local device
    python -m dspark_kernels simulate --profiles '' --sps-json sps.json --out sim/

The simulator's roofline profiles (engine/simulator/steptime.py) predict the step-time staircase;
this script measures it. It builds a synthetic target with the layer shapes of
``llama3-8b`` (Llama-3.1-8B: hidden 4096, 32/8 heads of 128, FFN 14336, vocab 128256, bf16),
random weights, and times with ``engine.sps_table.profile_sps``:

    t_target(B, C, L̄) = (n_layers / k)·t_k(B) + t_head(B) + overhead + kv·C·L̄

t_k(B): k decoder layers (``--layers``, default 4 of 32; every layer has the same shapes, so k of
them scale) on a verify batch of B tokens: RMSNorm, the fused QKV GEMM, the package's
``verify_attention`` over a paged KV cache, the output GEMM, RMSNorm, the fused gate/up GEMM,
SiLU·up, the down GEMM. The batch is ⌈B / q⌉ requests of q = ``--tokens-per-request`` verify
tokens (the last one shorter) over a 16-token context, so t_k is the part of a step that the
batch size sets. t_head(B): final RMSNorm and the LM-head GEMM. kv: the step time one cached
token of one request adds, from ``verify_attention`` alone timed at R ∈ {64, 256} requests × L ∈
{512, 2048} cached tokens (q = 3), a least-squares line in R·L, times n_layers; the simulator adds
kv·C·L̄ for the concurrency and context it simulates (``meta.kv_seconds_per_token``), so one table
serves every C and workload. overhead (``--overhead-ms``, default 0.3, the roofline's assumption:
sampling, scheduling, host work; not measured here) is ``meta.overhead_seconds``. Not timed:
embedding gather, RoPE, the KV append; the layers share one KV cache (the bytes each reads are the
same as with one cache each, and a 10⁹-byte cache is not L2-resident).

Drafters, timed per concurrency C (``--concurrency``) over ``--context`` cached tokens (default
1024), written as [C, seconds] lists: MTP-1 = 1 layer + LM head on C tokens; DSpark =
``--dspark-layers`` layers (default 5, the paper's Table 1 drafters) on C·γ tokens (γ =
``--gamma``, default 5, recorded as meta.gamma) + LM head on C·γ tokens + the package's
``markov_draft`` (fast path, r = 256) on [C, γ, V] base logits.

On CUDA each timed unit is a CUDA graph per shape (captured in profile_sps's first warm-up call),
so the table is device time as a graph-replaying engine sees it, not Python launch overhead;
``--no-graphs`` times eager calls. On CPU (``--smoke``) every call is eager and the numbers only
prove the pipeline.

Output: the simulator's JSON (``save_sps_json``): sps[0..Bmax], meta.draft_seconds, and meta
with the device, versions, shapes, k, q, context and which B were measured (others are
interpolated). Exit status 0; 2 on a bad option.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch

import dspark_kernels as dk
from dspark_kernels.engine.simulator.steptime import save_sps_json
from dspark_kernels.engine.sps_table import profile_sps

# Llama-3.1-8B config.json (the simulator's llama3-8b profile uses the same numbers).
SHAPES = {
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256, layers=32),
    # CPU smoke test: the same structure at toy sizes.
    "smoke": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=1000, layers=4),
}
PAGE_SIZE = 16
MARKOV_RANK = 256
# Context of the batch-size table: one page, so the attention's context reads are ~1 % of a 1024-2048
# token workload's and the kv term carries them instead.
TABLE_CONTEXT = 16
# (requests, cached tokens) at which verify_attention alone is timed for the kv coefficient.
KV_POINTS = ((64, 512), (64, 2048), (256, 512), (256, 2048))


class SyntheticTarget:
    """Random-weight decoder layers of a named shape over one paged KV cache (see the module docstring)."""

    def __init__(self, shape: dict, *, device, dtype, max_requests: int, max_query: int, context: int, seed: int = 0):
        self.s, self.device, self.dtype, self.context = shape, device, dtype, context
        g = torch.Generator(device=device).manual_seed(seed)
        h, hq, hk, d, f, v = (shape[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"))

        def w(*size):
            # 0.02-scaled normals, drawn on the device (1.5e9 values for llama3-8b: ~9 s on a CPU):
            # activations stay O(1) through a few layers, so no inf/NaN slows a kernel.
            return (0.02 * torch.randn(*size, generator=g, device=device)).to(dtype)

        self.layer = dict(wqkv=w(h, (hq + 2 * hk) * d), wo=w(hq * d, h), wgu=w(h, 2 * f), wd=w(f, h),
                          n1=torch.ones(h, device=device, dtype=dtype), n2=torch.ones(h, device=device, dtype=dtype))
        self.head = w(h, v)
        self.norm = torch.ones(h, device=device, dtype=dtype)
        pages_per_request = math.ceil((context + max_query) / PAGE_SIZE)
        pages = max_requests * pages_per_request
        self.k_cache = w(pages, PAGE_SIZE, hk, d)
        self.v_cache = w(pages, PAGE_SIZE, hk, d)
        self.page_table = torch.arange(pages, device=device, dtype=torch.int32).reshape(max_requests,
                                                                                        pages_per_request)

    def batch(self, tokens: int, per_request: int, context: int | None = None):
        """Metadata of a verify batch: ⌈tokens / per_request⌉ requests, the last one shorter, each over
        ``context`` cached tokens (default: the target's)."""
        requests = math.ceil(tokens / per_request)
        rows = torch.full((requests,), per_request, dtype=torch.int32)
        rows[-1] = tokens - per_request * (requests - 1)
        cu = torch.zeros(requests + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(rows, 0)
        # the verify tokens are already in the cache (verify_attention's contract)
        kv_lens = (self.context if context is None else context) + rows
        x = torch.randn(tokens, self.s["hidden"], device=self.device).to(self.dtype)
        return dict(x=x, page_table=self.page_table[:requests], kv_lens=kv_lens.to(self.device),
                    cu_verify=cu.to(self.device))

    def layers(self, b: dict, count: int) -> torch.Tensor:
        s, p = self.s, self.layer
        x = b["x"]
        tokens = x.shape[0]
        for _ in range(count):
            y = torch.nn.functional.rms_norm(x, (s["hidden"],), p["n1"])
            qkv = y @ p["wqkv"]
            q = qkv[:, : s["heads"] * s["head_dim"]].reshape(tokens, s["heads"], s["head_dim"])
            attn = dk.verify_attention(q, self.k_cache, self.v_cache, b["page_table"], b["kv_lens"], b["cu_verify"])
            x = x + attn.reshape(tokens, -1) @ p["wo"]
            y = torch.nn.functional.rms_norm(x, (s["hidden"],), p["n2"])
            gate, up = (y @ p["wgu"]).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ p["wd"]
        return x

    def attention(self, b: dict) -> torch.Tensor:
        """verify_attention alone (one layer's), on random queries."""
        s = self.s
        q = b["x"][:, :1].expand(-1, s["heads"] * s["head_dim"]).reshape(-1, s["heads"], s["head_dim"])
        return dk.verify_attention(q.contiguous(), self.k_cache, self.v_cache, b["page_table"], b["kv_lens"],
                                   b["cu_verify"])

    def lm_head(self, b: dict) -> torch.Tensor:
        return torch.nn.functional.rms_norm(b["x"], (self.s["hidden"],), self.norm) @ self.head


class Timed:
    """step(n) for profile_sps: runs fn(inputs(n)); on CUDA through one graph per n (captured on first call)."""

    def __init__(self, make_inputs, fn, graphs: bool):
        self.make_inputs, self.fn, self.graphs = make_inputs, fn, graphs
        self.n, self.inputs, self.graph = None, None, None
        self.graph_failures = []

    def __call__(self, n: int):
        if n != self.n:
            self.n, self.graph = n, None
            self.inputs = self.make_inputs(n)
            if self.graphs:
                self.fn(self.inputs)  # compile / autotune outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        self.fn(self.inputs)
                    self.graph = graph
                except RuntimeError as exc:  # a kernel that cannot be captured: time it eagerly, and say so
                    self.graph_failures.append(f"n={n}: {str(exc).splitlines()[0][:200]}")
                    torch.cuda.synchronize()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(self.inputs)


def measured_sizes(max_batch: int, dense_until: int, step: int, tile: int = 128) -> list[int]:
    """Every B up to dense_until, then every step-th B, both sides of every multiple of ``tile`` (where a
    128-row GEMM tile would start a new step), and Bmax; profile_sps interpolates between them."""
    sizes = set(range(1, min(dense_until, max_batch) + 1))
    sizes.update(range(dense_until + step, max_batch + 1, step))
    for edge in range(tile, max_batch + 1, tile):
        sizes.update(b for b in (edge, edge + 1) if b <= max_batch)
    sizes.add(max_batch)
    return sorted(sizes)


def kv_seconds_per_token(target: SyntheticTarget, n_layers: int, *, device, graphs: bool, repeats: int,
                         points=KV_POINTS) -> tuple[float, list]:
    """Least-squares slope of verify_attention time in R·L over ``points`` (q = 3), times n_layers."""
    rows = []
    for requests, context in points:
        step = Timed(lambda n, c=context: target.batch(n, 3, c), target.attention, graphs)
        prof = profile_sps(step, 3 * requests, device=device, warmup=2, repeats=repeats,
                           batch_sizes=[3 * requests])
        rows.append((requests * context, float(prof.raw_seconds[-1])))
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return max(slope, 0.0) * n_layers, [[int(a), b] for a, b in rows]


def draft_seconds(target: SyntheticTarget, shape: dict, concurrency: list[int], *, gamma: int, dspark_layers: int,
                  device, dtype, graphs: bool, repeats: int) -> tuple[dict, list]:
    """{"mtp": [[C, s]...], "dspark": [[C, s]...]} measured (median of repeats, CUDA events or host clock)."""
    v = shape["vocab"]
    g = torch.Generator(device="cpu").manual_seed(1)
    w1 = (0.02 * torch.randn(v, MARKOV_RANK, generator=g)).to(device=device, dtype=dtype)
    w2 = (0.02 * torch.randn(v, MARKOV_RANK, generator=g)).to(device=device, dtype=dtype)
    out, failures = {"mtp": [], "dspark": []}, []

    def mtp_inputs(c):
        return target.batch(c, 1)

    def mtp(b):
        b = dict(b, x=target.layers(b, 1))
        return target.lm_head(b)

    def dspark_inputs(c):
        b = target.batch(c * gamma, gamma)
        b.update(anchor=torch.zeros(c, dtype=torch.int64, device=device),
                 temperature=torch.ones(c, device=device), seed=torch.arange(c, device=device, dtype=torch.int64),
                 offset=torch.zeros((), dtype=torch.int64, device=device))
        return b

    def dspark(b):
        x = target.layers(b, dspark_layers)
        logits = target.lm_head(dict(b, x=x)).reshape(b["anchor"].shape[0], gamma, v)
        return dk.markov_draft(logits, b["anchor"], w1, w2, b["temperature"], b["seed"], b["offset"])

    for name, make, fn in (("mtp", mtp_inputs, mtp), ("dspark", dspark_inputs, dspark)):
        step = Timed(make, fn, graphs)
        prof = profile_sps(step, max(concurrency), device=device, warmup=2, repeats=repeats, batch_sizes=concurrency)
        out[name] = [[int(c), float(t)] for c, t in zip(prof.batch_sizes.tolist(), prof.raw_seconds.tolist())
                     if c in concurrency]
        failures += [f"{name} {f}" for f in step.graph_failures]
    return out, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sps_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON to write (simulator format)")
    p.add_argument("--target", default="llama3-8b", choices=[k for k in SHAPES if k != "smoke"])
    p.add_argument("--layers", type=int, default=4, help="decoder layers timed (scaled to the model's count)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest verify batch B")
    p.add_argument("--dense-until", type=int, default=64, help="measure every B up to this")
    p.add_argument("--batch-step", type=int, default=8,
                   help="then every this-many B (and both sides of every multiple of 128)")
    p.add_argument("--overhead-ms", type=float, default=0.3,
                   help="fixed per-step time the table adds (sampling, scheduling, host); an assumption, "
                        "the roofline's, default 0.3")
    p.add_argument("--tokens-per-request", type=int, default=3, help="verify tokens per request in the batch")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per request")
    p.add_argument("--gamma", type=int, default=5, help="DSpark drafts per request")
    p.add_argument("--dspark-layers", type=int, default=5)
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64,128,256",
                   help="C values the drafters are timed at")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true", help="time eager calls on CUDA")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the pipeline only)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on this machine's device (CUDA if present)")
    args = p.parse_args(argv)
    try:
        concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    small = args.smoke or args.tiny
    if small:
        args.max_batch, args.dense_until, args.batch_step, args.layers, args.dspark_layers = 24, 16, 4, 2, 2
        args.context, args.repeats = 32, 2
        concurrency = [1, 2, 4]
    if not (math.isfinite(args.overhead_ms) and args.overhead_ms >= 0):
        p.error("--overhead-ms must be >= 0")
    for name in ("layers", "max_batch", "dense_until", "batch_step", "tokens_per_request", "context", "gamma",
                 "dspark_layers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not concurrency or concurrency[0] < 1:
        p.error("--concurrency values must be >= 1")
    shape = SHAPES["smoke" if small else args.target]
    if args.layers > shape["layers"]:
        p.error(f"--layers {args.layers} exceeds the model's {shape['layers']}")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    graphs = cuda and not args.no_graphs
    t0 = time.perf_counter()
    kv_points = ((2, 8), (2, 32), (4, 8), (4, 32)) if small else KV_POINTS
    max_requests = max(math.ceil(args.max_batch / args.tokens_per_request), max(concurrency),
                       max(r for r, _ in kv_points))
    max_context = max(args.context, max(c for _, c in kv_points))
    target = SyntheticTarget(shape, device=device, dtype=dtype, max_requests=max_requests,
                             max_query=max(args.tokens_per_request, args.gamma), context=max_context)
    q = args.tokens_per_request
    sizes = measured_sizes(args.max_batch, args.dense_until, args.batch_step)
    table_context = min(TABLE_CONTEXT, args.context)
    with torch.inference_mode():
        layers_step = Timed(lambda n: target.batch(n, q, table_context), lambda b: target.layers(b, args.layers),
                            graphs)
        layers = profile_sps(layers_step, args.max_batch, device=device, warmup=2, repeats=args.repeats,
                             batch_sizes=sizes)
        head_step = Timed(lambda n: target.batch(n, q, table_context), target.lm_head, graphs)
        head = profile_sps(head_step, args.max_batch, device=device, warmup=2, repeats=args.repeats,
                           batch_sizes=sizes)
        kv, kv_rows = kv_seconds_per_token(target, shape["layers"], device=device, graphs=graphs,
                                           repeats=args.repeats, points=kv_points)
        target.context = args.context  # the drafters run over the workload's context
        drafts, failures = draft_seconds(target, shape, concurrency, gamma=args.gamma,
                                         dspark_layers=args.dspark_layers, device=device, dtype=dtype,
                                         graphs=graphs, repeats=args.repeats)
    scale = shape["layers"] / args.layers
    seconds = scale * layers.seconds[1:] + head.seconds[1:]  # both cleaned (non-decreasing): so is the sum
    sps = torch.zeros(args.max_batch + 1, dtype=torch.float64)
    sps[1:] = 1.0 / seconds
    failures = layers_step.graph_failures + head_step.graph_failures + failures
    meta = {
        "target_shape": "smoke" if small else args.target, "shape": shape, "layers_timed": args.layers,
        "layer_scale": scale, "tokens_per_request": q, "table_context": table_context,
        "kv_seconds_per_token": kv, "kv_points_rl_seconds": kv_rows,
        "overhead_seconds": args.overhead_ms * 1e-3, "overhead_note": "assumed (--overhead-ms), not measured",
        "context": args.context, "gamma": args.gamma,
        "dspark_layers": args.dspark_layers, "markov_rank": MARKOV_RANK, "measured_batch_sizes": sizes,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": str(dtype), "cuda_graphs": graphs, "graph_failures": failures,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "triton": _version("triton"), "cuda": torch.version.cuda},
        "seconds_layers_raw": layers.raw_seconds.tolist(), "seconds_head_raw": head.raw_seconds.tolist(),
        "timed": "t_target(B, C, L) = layer_scale * t_layers(B) + t_head(B) + overhead_seconds "
                 "+ kv_seconds_per_token * C * L; drafters as [C, seconds] at `context`",
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    name = f"{'smoke' if small else args.target}@{meta['device'].replace(' ', '_')}"
    path = save_sps_json(sps, args.out, name=name, gpus=1, draft_seconds=drafts, meta=meta)
    print(f"wrote {path}: B = 1..{args.max_batch} ({len(sizes)} measured), t(1) = {1e3 * seconds[0]:.3f} ms, "
          f"t(Bmax) = {1e3 * seconds[-1]:.3f} ms, kv {1e9 * kv:.3f} ns per cached token, {meta['wall_seconds']} s"
          + (f"; {len(failures)} shapes timed without a graph" if failures else ""))
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: the table is still valid, the field says so
        return None


if __name__ == "__main__":
    sys.exit(main())
