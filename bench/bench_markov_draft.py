"""Benchmark dspark_kernels.markov_draft against its floor and its peers.

Cases: R in {1, 8, 64, 256} requests x γ in {5, 7, 16} draft positions x
V in {129280 (DeepSeek-V3/V4), 151936 (Qwen3)}, Markov rank r = 256, vanilla
head (no confidence head), temperature 1 (the sampling path), base logits U
and both weights in bf16 on CUDA (fp32 on CPU).

Floor: U read once, W2 [V, r] read once per step (γ times: each
step's W2·W1[x_{k-1}] depends on the token just sampled), the γ gathered W1
rows (R·γ·r elements, negligible) and the outputs (tokens int32 and p_d fp32).
R=64, γ=7, V=151936 bf16: 136 MB + 7 x 78 MB = 682 MB -> 227 us on an H100.
FLOPs 2·R·γ·V·r (the W2 GEMVs) stay below the bandwidth term for R <= 256.

Providers:
  reference-eager     dspark_kernels.markov_draft(..., backend="reference")
  reference-compiled  torch.compile of the reference implementation function
                      (dspark_kernels.reference.markov_draft). The public
                      function dispatches to the custom op dspark::markov_draft,
                      which Dynamo treats as opaque, so compiling it would only
                      re-time the eager reference.
  triton, cuda        backend="triton" / "cuda" of the public op; skipped with
                      the reason unless dspark_kernels.ops.markov_draft
                      .IMPLS.available(device) lists them (cuda: only when the
                      extension dspark_kernels._C is built).
  flashinfer-topk-topp  FlashInfer top_k_top_p_sampling_from_logits on U[:, k]
                      for each k < γ, top_k = V and top_p = 1 per request (no
                      filtering: plain sampling; --fi-top-k / --fi-top-p time a
                      real filter). SAMPLING ONLY: no Markov term W2·W1[x_{k-1}],
                      no p_d output; a lower bound for the draft-side sampling.
  torch+flashinfer    what an engine without our kernel would run, logits in ->
                      tokens and p_d out: per step a W1 row gather and a cuBLAS
                      GEMM for W2·W1[x_{k-1}] plus U_k (torch), FlashInfer
                      top_k_top_p_sampling_from_logits (top_k = V, top_p = 1) for
                      x_k and FlashInfer softmax + a gather for p_d(x_k).
  The FlashInfer peers draw their own random numbers, so their tokens are not
  compared. They are marked "unavailable" with the reason, never an error, when
  flashinfer cannot be imported or its API does not match (the calls follow
  flashinfer-python 0.6.0: sampling.top_k_top_p_sampling_from_logits(logits,
  top_k, top_p) and sampling.softmax(logits, temperature=None)).

Usage (from the repository root):
  python -m bench.bench_markov_draft --out bench/out/markov_draft.json
  python -m bench.bench_markov_draft --R 64 --gamma 7 --V 151936 --providers triton,cuda
  python -m bench.bench_markov_draft --smoke --device cpu --out /tmp/markov.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "markov_draft"
# tests/test_bench.py: extra --smoke arguments, and the shape keys every case's params must hold.
SMOKE_TEST = ([], ("R", "gamma", "V", "rank", "dtype"))
FULL_R = [1, 8, 64, 256]
FULL_GAMMA = [5, 7, 16]
FULL_V = [129280, 151936]
FULL_RANK = 256
QUICK_R = [1, 3]
QUICK_GAMMA = [2]
QUICK_V = [257]  # not a multiple of any block size
QUICK_RANK = 8
SMOKE_R = [2]
SMOKE_GAMMA = [3]
SMOKE_V = [257]
# W1/W2 entries ~ N(0, 0.1^2): the Markov term W2·W1[x] has std sqrt(r)·0.01
# = 0.16 at r = 256, a perturbation of the N(0, 1) base logits as in a trained head.
WEIGHT_STD = 0.1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_case(R: int, gamma: int, V: int, rank: int, dtype: torch.dtype, device: torch.device) -> harness.Case:
    elt = torch.empty((), dtype=dtype).element_size()
    u_bytes = R * gamma * V * elt
    w2_bytes = V * rank * elt
    w1_rows = R * gamma * rank * elt
    small_in = R * 8 + R * 4 + R * 8 + 8  # anchor int64, temperature fp32, seed int64, offset
    outputs = R * gamma * (4 + 4)  # tokens int32 + token_probs fp32
    floor_bytes = u_bytes + gamma * w2_bytes + w1_rows + small_in + outputs

    def make_inputs() -> dict:
        g = torch.Generator(device=device).manual_seed(1000 * R + 10 * gamma + V)
        return {
            "base_logits": torch.randn(R, gamma, V, generator=g, device=device, dtype=dtype),
            "anchor": torch.randint(0, V, (R,), generator=g, device=device, dtype=torch.int64),
            "w1": torch.randn(V, rank, generator=g, device=device, dtype=dtype) * WEIGHT_STD,
            "w2": torch.randn(V, rank, generator=g, device=device, dtype=dtype) * WEIGHT_STD,
            "temperature": torch.ones(R, device=device, dtype=torch.float32),
            "seed": torch.arange(R, device=device, dtype=torch.int64) + 1234,
            "offset": torch.zeros((), device=device, dtype=torch.int64),
        }

    def summarize(out) -> dict:
        return {"mean_token_prob": float(out[1].float().mean())}

    return harness.Case(
        op=OP,
        name=f"R={R} g={gamma} V={V} r={rank}",
        params={"R": R, "gamma": gamma, "V": V, "rank": rank, "dtype": str(dtype).replace("torch.", ""),
                "head": "vanilla", "temperature": 1.0, "return_draft_probs": False, "device": device.type},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=2 * R * gamma * V * rank,
        # One call touches U, W2 (re-read per step, but the same bytes), W1 rows, outputs.
        resident_bytes=u_bytes + w2_bytes + w1_rows + small_in + outputs,
        extract=lambda out: out[0],
        summarize=summarize,
        floor_note="U once + W2 once per step (gamma times) + W1 rows + outputs; flops = 2*R*gamma*V*r",
    )


def _public_call(backend: str):
    def call(x: dict, backend: str, case: harness.Case):
        import dspark_kernels as dk

        return dk.markov_draft(x["base_logits"], x["anchor"], x["w1"], x["w2"], x["temperature"],
                               x["seed"], x["offset"], backend=backend)

    return harness.public_op_provider(OP, backend, call)


def _compiled_reference(case: harness.Case):
    from dspark_kernels.ops.markov_draft import OP

    fn = harness.compiled(OP.impls.reference)

    def call(x: dict):
        return fn(OP.normalize(OP.record(**x, return_draft_probs=False, return_draft_logits=False)))

    return call


# --------------------------------------------------------------------------- FlashInfer peers


def _flashinfer_sampling_module(case: harness.Case):
    """flashinfer.sampling, or ProviderUnavailable saying why not."""
    if case.params["device"] != "cuda":
        raise harness.ProviderUnavailable("FlashInfer needs CUDA tensors")
    try:
        import flashinfer.sampling as fis
    except Exception as exc:  # ImportError, or a JIT/CUDA setup failure inside flashinfer's import
        raise harness.ProviderUnavailable(f"flashinfer not importable: {type(exc).__name__}: {exc}") from exc
    for name in ("top_k_top_p_sampling_from_logits", "softmax"):
        if not hasattr(fis, name):
            raise harness.ProviderUnavailable(f"flashinfer.sampling has no {name} (version mismatch)")
    return fis


def _filters(args):
    """prepare() that adds FlashInfer's per-request top_k / top_p (outside the timed call)."""
    def prepare(x: dict) -> dict:
        R, gamma, V = x["base_logits"].shape
        top_k = V if args.fi_top_k is None else args.fi_top_k
        dev = x["base_logits"].device
        return {
            **x,
            "fi_steps": [x["base_logits"][:, k].contiguous() for k in range(gamma)],
            "fi_top_k": torch.full((R,), top_k, dtype=torch.int32, device=dev),
            "fi_top_p": torch.full((R,), args.fi_top_p, dtype=torch.float32, device=dev),
        }

    return prepare


def _flashinfer_topk_topp(case: harness.Case):
    sample = _flashinfer_sampling_module(case).top_k_top_p_sampling_from_logits

    def call(x: dict):
        return [sample(step, x["fi_top_k"], x["fi_top_p"]) for step in x["fi_steps"]]

    return call


def _torch_flashinfer(case: harness.Case):
    fis = _flashinfer_sampling_module(case)
    sample = fis.top_k_top_p_sampling_from_logits
    softmax = fis.softmax

    def call(x: dict):
        w1, w2 = x["w1"], x["w2"]
        prev = x["anchor"]
        tokens, probs = [], []
        for step in x["fi_steps"]:
            # z_k = U_k + W2·W1[x_{k-1}]: bf16 GEMM (fp32 accumulate), sum in fp32.
            z = step.float() + (w1[prev] @ w2.T).float()
            tok = sample(z, x["fi_top_k"], x["fi_top_p"])
            p = softmax(z, temperature=x["temperature"])
            probs.append(p.gather(1, tok.long()[:, None])[:, 0])
            tokens.append(tok)
            prev = tok.long()
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    return call


def providers(args=None) -> list[harness.Provider]:
    if args is None:
        args = parser().parse_args([])
    prepare = _filters(args)
    filt = f"top_k={'V' if args.fi_top_k is None else args.fi_top_k}, top_p={args.fi_top_p}"
    return [
        harness.Provider(harness.REFERENCE_EAGER, _public_call("reference"),
                         note='dspark_kernels.markov_draft(backend="reference")'),
        harness.Provider("reference-compiled", _compiled_reference,
                         note="torch.compile(dspark_kernels.reference.markov_draft.markov_draft); the "
                              "dspark::markov_draft custom op is opaque to Dynamo, so the inner reference is compiled"),
        harness.Provider("triton", _public_call("triton"), note='backend="triton"'),
        harness.Provider("cuda", _public_call("cuda"), note='backend="cuda"'),
        harness.Provider("flashinfer-topk-topp", _flashinfer_topk_topp, comparable=False, prepare=prepare,
                         external=True,
                         note=f"SAMPLING ONLY: gamma calls of flashinfer.sampling.top_k_top_p_sampling_from_logits "
                              f"on U[:, k] ({filt}); no Markov term, no p_d; own RNG"),
        harness.Provider("torch+flashinfer", _torch_flashinfer, comparable=False, prepare=prepare, external=True,
                         note=f"per step: torch W1 gather + GEMM W2*W1[x] + U_k, flashinfer "
                              f"top_k_top_p_sampling_from_logits ({filt}), flashinfer softmax + gather for p_d; "
                              "own RNG"),
    ]


def parser():
    p = harness.r_gamma_parser(__doc__, FULL_R, FULL_GAMMA)
    p.add_argument("--V", type=harness.int_list, help=f"comma list of vocab sizes (default {FULL_V})")
    p.add_argument("--rank", type=int, help=f"Markov rank r (default {FULL_RANK}, {QUICK_RANK} with --quick/--smoke)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="U and weight dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--fi-top-k", type=int, help="top_k given to the FlashInfer peers (default V: no filtering)")
    p.add_argument("--fi-top-p", type=float, default=1.0,
                   help="top_p given to the FlashInfer peers (default 1.0: no filtering)")
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    Vs = harness.shape_grid(args, "V", FULL_V, QUICK_V, SMOKE_V)
    rank = args.rank or (QUICK_RANK if (args.quick or args.smoke) else FULL_RANK)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [make_case(R, gamma, V, rank, dtype, device) for V in Vs for gamma in gammas for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    args = parser().parse_args(argv)
    cfg = harness.run_config(args)
    chosen = harness.select_providers(providers(args), args.providers, args.exclude_providers)
    report = harness.run_benchmark(OP, build_cases(args, cfg.device), chosen, cfg)
    return harness.finish(report, args)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
