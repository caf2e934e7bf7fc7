"""Benchmark dspark_kernels.rejection_sample against its floor and its peers.

Cases: R in {1, 8, 64, 256} requests, γ in {5, 7, 16} drafts, V in {129280,
151936}; target logits bf16 [T, V] on CUDA (fp32 on CPU) with T = R·(γ+1),
every request verifying all γ drafts (lengths = γ, cu_verify = arange·(γ+1)),
temperature 1 (the sampling path), no top-k / top-p unless --top-k / --top-p
give one value for every request (then the target's filtered distribution is
what drafts are verified against). Draft modes:
  onehot   draft_probs None: one-hot drafts (q = e_x)
  full     draft_probs [R, γ, V] fp32
  minimal  byte-minimal: draft_token_probs [R, γ] + draft_logits [R, γ, V] fp32
           (draft_logits fp32 as markov_draft returns them)

Acceptance is realistic, not adversarial: target row j of each request gets a
logit bump at draft x_{j+1} sized so the target puts ~--accept (0.8) of its
mass there (e^b = a/(1-a)·(V-1)·e^{1/2}, the expected partition sum of V-1
N(0,1) logits), and so do the draft distributions in full / minimal mode. With
random drafts nearly every request would reject at the first draft and a
kernel that stops reading early would look better than it is in service. The
report records the mean accepted length per case.

Floor: target logits read once (R=64, γ=7, V=151936: 156 MB ->
52 us on an H100); full mode adds the draft probs (+272 MB -> 143 us);
minimal adds p_d of each draft and one fp32 draft-logit row per request (the
row at the first rejection, counted for every request: the worst case).
No matmul FLOPs, so the floor is the bandwidth term.

Providers:
  reference-eager     dspark_kernels.rejection_sample(..., backend="reference")
  reference-compiled  torch.compile of the reference implementation function
                      (dspark_kernels.reference.rejection_sample); the custom op
                      dspark::rejection_sample is opaque to Dynamo.
  triton, cuda        backend="triton" / "cuda" of the public op; skipped with
                      the reason unless dspark_kernels.ops.rejection_sample
                      .IMPLS.available(device) lists them (cuda: only when the
                      extension dspark_kernels._C is built).
  flashinfer-chain    logits in, tokens out: FlashInfer's softmax of the target
                      logits (and of the draft logits in minimal mode; the
                      one-hot q materialised in onehot mode, FlashInfer having
                      no one-hot mode), then chain_speculative_sampling. All of
                      it is inside the timed call. Bound as in flashinfer-python
                      0.6.0: sampling.softmax(logits, temperature=Tensor[rows])
                      and sampling.chain_speculative_sampling(draft_probs
                      [R, γ, V], draft_token_ids [R, γ], target_probs
                      [R, γ+1, V]) -> (output_token_ids [R, γ+1] -1 padded,
                      accepted, emitted). Own RNG: tokens are not compared.
                      "unavailable" with the reason (never an error of the run)
                      when flashinfer cannot be imported or its API differs.

Usage (from the repository root):
  python -m bench.bench_rejection_sample --out bench/out/rejection_sample.json
  python -m bench.bench_rejection_sample --R 64 --gamma 7 --V 151936 --modes minimal
  python -m bench.bench_rejection_sample --smoke --device cpu --out /tmp/rejection.json
"""

from __future__ import annotations

import math
import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "rejection_sample"
# tests/test_bench.py: onehot and minimal cover both FlashInfer draft paths and both draft inputs of the
# op ("full" only adds a tensor and ~6 s of compiling); and the shape keys every case's params must hold.
SMOKE_TEST = (["--modes", "onehot,minimal"], ("R", "gamma", "V", "T", "mode", "dtype"))
FULL_R = [1, 8, 64, 256]
FULL_GAMMA = [5, 7, 16]
FULL_V = [129280, 151936]
QUICK_R = [1, 3]
QUICK_GAMMA = [2]
QUICK_V = [257]  # not a multiple of any block size
SMOKE_R = [2]
SMOKE_GAMMA = [3]
SMOKE_V = [257]
MODES = ("onehot", "full", "minimal")
DEFAULT_ACCEPT = 0.8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bump_for(accept: float, V: int) -> float:
    """Logit bump b that gives one token probability ~accept among V-1 N(0,1) logits."""
    return math.log(accept / (1.0 - accept) * (V - 1) * math.exp(0.5))


def _bumped_logits(shape, tokens: torch.Tensor, bump: float, g: torch.Generator, dtype, device) -> torch.Tensor:
    """N(0, 1) logits of `shape` [..., V] plus `bump` at tokens[...]."""
    logits = torch.randn(shape, generator=g, device=device, dtype=dtype)
    logits.scatter_add_(-1, tokens[..., None].long(), torch.full(tokens.shape + (1,), bump, dtype=dtype, device=device))
    return logits


def make_case(R: int, gamma: int, V: int, mode: str, dtype: torch.dtype, accept: float,
              device: torch.device, top_k: int | None = None, top_p: float | None = None) -> harness.Case:
    T = R * (gamma + 1)
    elt = torch.empty((), dtype=dtype).element_size()
    target_bytes = T * V * elt
    small_in = R * gamma * 4 + R * 4 + (R + 1) * 4 + R * 4 + R * 8 + 8  # drafts, lengths, cu, temp, seed, offset
    outputs = R * (gamma + 1) * 4 + R * 4  # tokens int32 + num_accepted int32
    extra = {"onehot": 0, "full": R * gamma * V * 4, "minimal": R * gamma * 4 + R * V * 4}[mode]
    floor_bytes = target_bytes + small_in + outputs + extra
    bump = bump_for(accept, V)

    def make_inputs() -> dict:
        g = torch.Generator(device=device).manual_seed(1000 * R + 10 * gamma + V + MODES.index(mode))
        drafts = torch.randint(0, V, (R, gamma), generator=g, device=device, dtype=torch.int32)
        # Row r*(γ+1)+j (j < γ) predicts draft j+1 and is bumped there; the bonus row j = γ
        # is bumped at a random token, so every target row is equally peaked.
        rows_tokens = torch.cat([drafts, torch.randint(0, V, (R, 1), generator=g, device=device,
                                                       dtype=torch.int32)], dim=1).reshape(T)
        target = _bumped_logits((T, V), rows_tokens, bump, g, torch.float32, device)
        x = {
            "target_logits": target.to(dtype),
            "draft_tokens": drafts,
            "draft_probs": None,
            "lengths": torch.full((R,), gamma, dtype=torch.int32, device=device),
            "cu_verify": torch.arange(R + 1, dtype=torch.int32, device=device) * (gamma + 1),
            "temperature": torch.ones(R, dtype=torch.float32, device=device),
            "seed": torch.arange(R, dtype=torch.int64, device=device) + 4321,
            "offset": torch.zeros((), dtype=torch.int64, device=device),
            "draft_token_probs": None,
            "draft_logits": None,
            "top_k": None if top_k is None else torch.full((R,), top_k, dtype=torch.int32, device=device),
            "top_p": None if top_p is None else torch.full((R,), top_p, dtype=torch.float32, device=device),
        }
        del target
        if mode != "onehot":
            draft_logits = _bumped_logits((R, gamma, V), drafts, bump, g, torch.float32, device)
            if mode == "full":
                x["draft_probs"] = torch.softmax(draft_logits, dim=-1)
            else:
                x["draft_logits"] = draft_logits
                x["draft_token_probs"] = torch.softmax(draft_logits, dim=-1).gather(-1, drafts[..., None].long())[..., 0]
        return x

    def summarize(out) -> dict:
        return {"mean_accepted": float(out[1].float().mean()), "gamma": gamma}

    filters = "".join(f" {k}={v}" for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None)
    return harness.Case(
        op=OP,
        name=f"{mode} R={R} g={gamma} V={V}{filters}",
        params={"mode": mode, "R": R, "gamma": gamma, "V": V, "T": T, "dtype": str(dtype).replace("torch.", ""),
                "temperature": 1.0, "target_accept": accept, "device": device.type,
                "top_k": top_k, "top_p": top_p},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=0,
        # minimal mode keeps [R, γ, V] draft logits in memory but one call reads one row per request.
        resident_bytes=floor_bytes,
        extract=lambda out: out[0],
        summarize=summarize,
        floor_note={
            "onehot": "target logits once + drafts + outputs",
            "full": "target logits once + fp32 draft probs [R, gamma, V] + drafts + outputs",
            "minimal": "target logits once + p_d per draft + one fp32 draft-logit row per request + outputs",
        }[mode],
    )


def _public_call(backend: str):
    def call(x: dict, backend: str, case: harness.Case):
        import dspark_kernels as dk

        return dk.rejection_sample(
            x["target_logits"], x["draft_tokens"], x["draft_probs"], x["lengths"], x["cu_verify"],
            x["temperature"], x["seed"], x["offset"], top_k=x["top_k"], top_p=x["top_p"],
            draft_token_probs=x["draft_token_probs"], draft_logits=x["draft_logits"], backend=backend,
        )

    return harness.public_op_provider(OP, backend, call)


def _compiled_reference(case: harness.Case):
    from dspark_kernels.ops.rejection_sample import OP

    fn = harness.compiled(OP.impls.reference)

    def call(x: dict):
        return fn(OP.normalize(OP.record(**x)))

    return call


def _flashinfer_chain(case: harness.Case):
    if case.params["device"] != "cuda":
        raise harness.ProviderUnavailable("FlashInfer needs CUDA tensors")
    try:
        import flashinfer.sampling as fis
    except Exception as exc:  # ImportError, or a JIT/CUDA setup failure inside flashinfer's import
        raise harness.ProviderUnavailable(f"flashinfer not importable: {type(exc).__name__}: {exc}") from exc
    for name in ("chain_speculative_sampling", "softmax"):
        if not hasattr(fis, name):
            raise harness.ProviderUnavailable(f"flashinfer.sampling has no {name} (version mismatch)")
    chain = fis.chain_speculative_sampling
    softmax = fis.softmax
    mode = case.params["mode"]
    top_k, top_p = case.params["top_k"], case.params["top_p"]
    for needed, name in ((top_k, "top_k_renorm_probs"), (top_p, "top_p_renorm_probs")):
        if needed is not None and not hasattr(fis, name):
            raise harness.ProviderUnavailable(f"flashinfer.sampling has no {name} (version mismatch)")

    def filtered(probs: torch.Tensor) -> torch.Tensor:
        # The target's distribution after top-k then top-p, as our op applies them.
        if top_k is not None:
            probs = fis.top_k_renorm_probs(probs, top_k)
        if top_p is not None:
            probs = fis.top_p_renorm_probs(probs, top_p)
        return probs

    def call(x: dict):
        R, gamma = x["draft_tokens"].shape
        V = x["target_logits"].shape[1]
        target_probs = filtered(softmax(x["target_logits"], temperature=x["fi_row_temperature"])).view(R, gamma + 1, V)
        if mode == "full":
            draft_probs = x["draft_probs"]
        elif mode == "minimal":
            draft_probs = softmax(x["draft_logits"].view(R * gamma, V),
                                  temperature=x["fi_draft_temperature"]).view(R, gamma, V)
        else:
            draft_probs = torch.zeros((R, gamma, V), dtype=torch.float32, device=target_probs.device)
            draft_probs.scatter_(-1, x["draft_tokens"][..., None].long(), 1.0)
        out = chain(draft_probs, x["draft_tokens"], target_probs)
        # 0.6.0 returns (output_token_ids, accepted, emitted); very old releases only the ids.
        return out[0] if isinstance(out, (tuple, list)) else out

    return call


def _flashinfer_prepare(x: dict) -> dict:
    """Per-row temperatures (what an engine keeps per verify row), outside the timed call."""
    R, gamma = x["draft_tokens"].shape
    return {
        **x,
        "fi_row_temperature": x["temperature"].repeat_interleave(gamma + 1),
        "fi_draft_temperature": x["temperature"].repeat_interleave(gamma),
    }


def providers() -> list[harness.Provider]:
    return [
        harness.Provider(harness.REFERENCE_EAGER, _public_call("reference"),
                         note='dspark_kernels.rejection_sample(backend="reference")'),
        harness.Provider("reference-compiled", _compiled_reference,
                         note="torch.compile(dspark_kernels.reference.rejection_sample.rejection_sample); the "
                              "dspark::rejection_sample custom op is opaque to Dynamo, so the inner reference is compiled"),
        harness.Provider("triton", _public_call("triton"), note='backend="triton"'),
        harness.Provider("cuda", _public_call("cuda"), note='backend="cuda"'),
        harness.Provider("flashinfer-chain", _flashinfer_chain, comparable=False, prepare=_flashinfer_prepare,
                         external=True,
                         note="logits in -> tokens out: flashinfer softmax (target; draft in minimal mode; one-hot q "
                              "built in onehot mode) + chain_speculative_sampling, all timed; different RNG"),
    ]


def parser():
    p = harness.r_gamma_parser(__doc__, FULL_R, FULL_GAMMA)
    p.add_argument("--V", type=harness.int_list, help=f"comma list of vocab sizes (default {FULL_V})")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of draft modes from {MODES}")
    p.add_argument("--accept", type=float, default=DEFAULT_ACCEPT,
                   help=f"target probability of each draft token, sets the acceptance rate (default {DEFAULT_ACCEPT})")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="target logit dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--top-k", type=int, help="top_k of every request (default: none)")
    p.add_argument("--top-p", type=float, help="top_p of every request (default: none)")
    return p


def checked_modes(args, known: tuple) -> list[str]:
    """--modes (each one of ``known``) and --accept (in (0, 1)) checked; the modes asked for, in order."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in known]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {known}")
    if not 0.0 < args.accept < 1.0:
        raise SystemExit(f"--accept must lie in (0, 1), got {args.accept}")
    return modes


def logit_dtype(args, device: torch.device) -> torch.dtype:
    """--dtype, else bf16 on CUDA (the engines' target logits) and fp32 on CPU (no bf16 math interpreted)."""
    return DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def build_cases(args, device: torch.device) -> list[harness.Case]:
    modes = checked_modes(args, MODES)
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    Vs = harness.shape_grid(args, "V", FULL_V, QUICK_V, SMOKE_V)
    dtype = logit_dtype(args, device)
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise SystemExit(f"--top-p must lie in (0, 1], got {args.top_p}")
    return [make_case(R, gamma, V, mode, dtype, args.accept, device, args.top_k, args.top_p)
            for mode in modes for V in Vs for gamma in gammas for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
