"""Step-time models for the serving simulator: how long one draft-and-verify round takes.

A round at concurrency C (requests in the batch) that verifies B tokens
(B = C anchors + the drafts the policy admits) takes

    t_round(B) = t_target(B) + t_draft(policy, C)        seconds,

and the scheduler is given the table sps[B] = 1 / t_round(B) (sps[0] = 0),
which is what :func:`dspark_kernels.engine.sps_table.profile_sps` measures
when its ``step`` times a whole round. The simulator charges exactly that
time, so the scheduler's table is the truth (a perfectly profiled engine).

Two kinds of model:

(a) :class:`TableStepModel` — a measured table. ``engine.sps_table`` has no
    save function (its :class:`SPSProfile` is an in-memory result), so this
    module defines a small JSON format and its writer/reader
    (:func:`save_sps_json`, :func:`load_sps_json`)::

        {"format": "dspark_kernels.sps_table", "version": 1,
         "sps": [0, sps[1], ..., sps[Bmax]],
         "meta": {"name": ..., "gpus": 1, "draft_seconds": {"mtp": s, "dspark": s}, ...}}

    t_target(B) = 1 / sps[B] + meta.overhead_seconds + meta.kv_seconds_per_token·C·L̄
    (both optional, default 0); t_draft is meta.draft_seconds[drafter] (0 when
    absent: the table is then taken as the whole round): seconds, or a list of
    [C, seconds] pairs with integer C ascending, read by linear interpolation
    in C (held constant past either end), because a drafter's time grows with
    the requests it drafts for (bench/sps_profile.py measures such a list).
    kv_seconds_per_token is the step time one cached context token of one
    request adds (the attention's KV reads over all layers), so a table
    measured over a short context serves every concurrency and context; a
    table without it is used as measured, whatever C and L̄ it is applied to.
    meta.gamma, when present, is the DSpark drafter's γ in the draft times, and
    a simulation at another γ is refused. ``gpus`` divides the throughput into
    tok/s/GPU (default 1).

(b) :class:`RooflineStepModel` — a named target on a named GPU. With G GPUs
    splitting the work evenly (tensor/expert parallel; assumed perfectly
    balanced), B verify tokens, C requests of mean context L̄:

        t_target(B) = overhead + latency
                      + max(bytes(B) / (G·bw), flops_w(B) / (G·rate_w) + flops_a(B) / (G·rate_a), comm(B))

        overhead   fixed per step (sampling, scheduling, host, non-layer launches): 0.3 ms
        latency    = n_layers·20 µs + n_moe·2·a2a       (kernel latencies that do not shrink with
                     the batch; a2a = 40 µs per dispatch or combine on NVLink, 80 µs across nodes)

        bytes(B)  = P_always·b + n_moe·E_touched(B)·P_expert·b + C·L̄·kv        (weights + KV read once)
        E_touched(T) = E·(1 − (1 − k/E)^T)   distinct routed experts that T tokens touch per MoE layer
                       (each token picks k of E experts; independent uniform routing assumed)
        flops_w(B) = 2·P_always·rows(B) + 2·n_moe·P_expert·Σ_e E[⌈n_e/64⌉·64]   (n_e ~ Binomial(B, k/E):
                     tokens routed to expert e; see expert_padded_rows)
        rows(B)    = ⌈B / 128⌉·128          GEMM tile quantisation of the token dimension (tensor
                                             parallel: every GPU multiplies all B rows by its weight shard)
        flops_a(B) = B·L̄·f_attn                attention over the context (f_attn FLOPs per query-key pair)
        comm(B)    = (B/G)·k·d·3 B·n_moe·max(f_nvl / nvlink, f_ib / scaleout)     MoE all-to-all
                     (FP8 dispatch 1 B + BF16 combine 2 B per hidden value; f = share of peers on
                     this node / other nodes); 0 for a dense target on one GPU.

    P_always: every weight read for any token (attention, dense FFNs, shared
    experts, routers, LM head); b bytes per weight; kv bytes per token of
    context (all layers); bw, rate = datasheet peak × achievable fraction.
    The ⌈·⌉ terms make the compute-bound part of the curve a staircase (a
    128-row tile costs the same for 1 or 128 tokens; expert GEMMs pad each
    expert's tokens to a 64-row tile), which is what makes the causal
    scheduler's early stop and the async global search differ.

    Draft: MTP-1 runs ``mtp_layers`` layers of the target's shape (+ LM head)
    on the C anchors; DSpark's parallel backbone runs ``dspark_layers`` such
    layers on C·γ positions (+ LM head for the base logits: the Markov head
    needs full-vocabulary U_k at every position) and its Markov head γ
    sequential steps, each reading W2 [V, r] once (bf16) plus two kernel
    launches (markov_draft's fast path: 2 launches per step). Each drafter
    layer also pays its share of the per-layer latency. MTP-1 is one layer
    (DeepSeek-V3's MTP module). The DSpark backbone is 5 layers on the dense
    target (the paper's §4.1 setup: "5 for DSpark and DFlash" drafter layers
    for the Qwen3 targets of Table 1) and 3 on the MoE target (§5.1, the
    production drafter of DeepSeek-V4: "three MoE layers"); ``--dspark-layers``
    overrides both. The production drafter also uses "sliding window attention
    of 128" (§5.1), so on the MoE target the DSpark backbone attends over
    min(L̄, 128) context tokens (its KV bytes and attention FLOPs); the dense
    target's drafter attends over the whole context, as a DFlash drafter reads
    the target's context features.

Every constant is named below (module constants, :data:`GPUS`, :data:`TARGETS`)
with its source; "assumption" marks those that are not datasheet or
model-card facts.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import asdict, dataclass, field

import torch

__all__ = [
    "GPU",
    "GPUS",
    "RooflineStepModel",
    "SPS_FORMAT",
    "StepModel",
    "TARGETS",
    "TableStepModel",
    "Target",
    "load_sps_json",
    "named_profile",
    "profile_names",
    "save_sps_json",
    "experts_touched",
    "expert_padded_rows",
]

SPS_FORMAT = "dspark_kernels.sps_table"
SPS_VERSION = 1

# Token-dimension GEMM tile: Hopper wgmma GEMMs (CUTLASS/cuBLAS) use 128-row CTA tiles for the
# large dense projections, so 1..128 tokens cost one tile. Assumption about the kernel, stated.
DENSE_ROW_TILE = 128
# Grouped expert GEMMs in decode use a smaller 64-row block (the minimum wgmma M is 64). Assumption.
EXPERT_ROW_TILE = 64
# A kernel launch inside a CUDA graph: a few µs. Assumption (no GPU measured here yet).
LAUNCH_SECONDS = 4e-6
# markov_draft fast path: 2 launches per Markov step (README, "Backends").
MARKOV_LAUNCHES_PER_STEP = 2
# Markov head rank r (DESIGN.md conventions: 256, as DeepSpec's released heads).
MARKOV_RANK = 256
# Latency of one MoE all-to-all (a dispatch or a combine) at decode sizes: tens of µs on NVLink,
# about twice that across nodes over RDMA. Assumptions (order of magnitude of published low-latency
# EP kernels; nothing measured here).
A2A_LATENCY_NVLINK = 40e-6
A2A_LATENCY_SCALEOUT = 80e-6
# Share of HBM the weights may take when choosing how many GPUs a model spans; the rest is KV cache
# and activations. Assumption (a common serving rule of thumb, not a measurement).
WEIGHT_SHARE_OF_HBM = 0.75
# Share of HBM usable for weights + KV when deciding which concurrencies fit. Assumption.
USABLE_HBM_SHARE = 0.90


@dataclass(frozen=True)
class GPU:
    """One GPU's datasheet ceilings and the fractions of them a tuned kernel achieves."""

    name: str
    hbm_bytes_per_s: float
    hbm_bytes: float
    bf16_flops: float  # dense tensor-core FLOP/s
    fp8_flops: float  # dense tensor-core FLOP/s
    nvlink_bytes_per_s: float  # per GPU, one direction
    scaleout_bytes_per_s: float  # per GPU, inter-node, one direction
    gpus_per_node: int
    bandwidth_efficiency: float
    matmul_efficiency: float
    source: str


# NVIDIA H100 SXM5 datasheet: HBM3 3.35 TB/s, 80 GB, 989 TFLOP/s BF16 and 1979 TFLOP/s FP8 dense
# (the datasheet's 1979/3958 are dense/sparse), NVLink 4 900 GB/s bidirectional (450 GB/s per
# direction); ConnectX-7 400 Gb/s = 50 GB/s per GPU between nodes; 8 GPUs per HGX node.
# Achievable fractions: DESIGN.md "~3.0 TB/s achievable HBM, ~800 TFLOP/s bf16" on H100 = 0.90 and
# 0.81 of the peaks; the same fractions are assumed for FP8 and for H200.
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 3.35e12, 80e9, 989e12, 1979e12, 450e9, 50e9, 8, 0.90, 0.81,
                "NVIDIA H100 SXM5 datasheet; efficiencies from DESIGN.md (3.0 TB/s, 800 TFLOP/s)"),
    # NVIDIA H200 SXM datasheet: HBM3e 4.8 TB/s, 141 GB; same tensor cores and NVLink as H100 SXM.
    "h200": GPU("H200 SXM", 4.8e12, 141e9, 989e12, 1979e12, 450e9, 50e9, 8, 0.90, 0.81,
                "NVIDIA H200 SXM datasheet; efficiencies as H100 (assumption)"),
}


@dataclass(frozen=True)
class Target:
    """A target model's shape, reduced to what the roofline needs (all counts are parameters)."""

    name: str
    layers: int
    moe_layers: int  # layers whose FFN is routed experts (the rest have a dense FFN)
    hidden: int
    vocab: int
    attn_params: int  # per layer
    dense_ffn_params: int  # per dense-FFN layer
    head_params: int  # LM head (the embedding is a gather, not a GEMM: not counted)
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0
    shared_experts: int = 0
    expert_params: int = 0
    router_params: int = 0
    weight_bytes: float = 2.0  # per parameter
    matmul_dtype: str = "bf16"  # rate used for the weight GEMMs
    kv_bytes_per_token: float = 0.0  # all layers
    attn_flops_per_pair: float = 0.0  # all layers, per (query token, context token)
    total_params: int = 0
    overhead_seconds: float = 0.3e-3  # per step: sampling, scheduling, host, non-layer launches (assumption)
    layer_latency_seconds: float = 20e-6  # per layer: ~a dozen kernels of a few µs each in a graph (assumption)
    mtp_layers: int = 1
    dspark_layers: int = 5
    dspark_window: int | None = None  # context tokens the DSpark backbone attends over (None: all)
    source: str = ""

    @property
    def always_params(self) -> int:
        """Weights every step reads whatever the batch: attention, dense FFNs, shared experts, routers, head."""
        dense_layers = self.layers - self.moe_layers
        per_moe = self.shared_experts * self.expert_params + self.router_params
        return self.layers * self.attn_params + dense_layers * self.dense_ffn_params + self.moe_layers * per_moe \
            + self.head_params

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies (the MoE 'active' count, LM head included, embedding excluded)."""
        return self.always_params + self.moe_layers * self.experts_per_token * self.expert_params


def _llama3_8b() -> Target:
    # Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 heads / 8 KV heads of 128, FFN 14336,
    # vocab 128256, untied embeddings, bf16.
    layers, h, heads, kv_heads, d, ffn, vocab = 32, 4096, 32, 8, 128, 14336, 128256
    attn = h * heads * d + 2 * h * kv_heads * d + heads * d * h
    mlp = 3 * h * ffn
    return Target(
        name="llama3-8b", layers=layers, moe_layers=0, hidden=h, vocab=vocab, attn_params=attn,
        dense_ffn_params=mlp, head_params=vocab * h, weight_bytes=2.0, matmul_dtype="bf16",
        # K and V, 8 heads x 128, bf16, every layer: 2·8·128·2 B = 4 KiB per layer, 128 KiB per token.
        kv_bytes_per_token=2 * kv_heads * d * 2 * layers,
        # QKᵀ and PV: 2 FLOPs per multiply-add, 32 query heads x 128 each: 4·32·128 per layer.
        attn_flops_per_pair=4 * heads * d * layers,
        total_params=layers * (attn + mlp) + 2 * vocab * h,
        # With the default overhead and layer latency (0.3 ms + 32 x 20 µs) the model's no-speculation
        # C = 1 step at a 2048-token context is 6.0 ms on H100, near the 6.78 ms TPOT a third party
        # measured for the same-size Qwen3-8B on 1xH100 in vLLM at C = 1
        # (huggingface.co/Dogacel/Qwen3-8B-DSpark).
        source="Llama-3.1-8B config.json (meta-llama); bf16 weights and KV",
    )


def _deepseek_v3() -> Target:
    # DeepSeek-V3 config.json: 61 layers (first 3 dense FFN 18432, then 58 MoE), hidden 7168,
    # 128 heads, MLA q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v 128; MoE 256 routed
    # experts top-8 + 1 shared, expert FFN 2048; vocab 129280; FP8 weights (the released checkpoint).
    # 671B total / 37B active (DeepSeek-V3 technical report; 36.6B active in the weight README).
    layers, moe_layers, h, heads, vocab = 61, 58, 7168, 128, 129280
    q_lora, kv_lora, nope, rope, v = 1536, 512, 128, 64, 128
    attn = h * q_lora + q_lora * heads * (nope + rope) + h * (kv_lora + rope) + kv_lora * heads * (nope + v) \
        + heads * v * h
    dense_ffn = 3 * h * 18432
    expert = 3 * h * 2048
    router = h * 256
    total = layers * attn + 3 * dense_ffn + moe_layers * ((256 + 1) * expert + router) + 2 * vocab * h
    return Target(
        name="deepseek-v3", layers=layers, moe_layers=moe_layers, hidden=h, vocab=vocab, attn_params=attn,
        dense_ffn_params=dense_ffn, head_params=vocab * h, experts=256, experts_per_token=8, shared_experts=1,
        expert_params=expert, router_params=router, weight_bytes=1.0, matmul_dtype="fp8",
        # MLA caches the 512-d latent + 64-d rope key per layer; bf16: 576·2 B = 1152 B per layer.
        kv_bytes_per_token=(kv_lora + rope) * 2 * layers,
        # Absorbed MLA decode: scores over 576 dims and values over the 512-d latent, 128 heads.
        attn_flops_per_pair=2 * heads * ((kv_lora + rope) + kv_lora) * layers,
        total_params=total,
        dspark_layers=3, dspark_window=128,
        source="DeepSeek-V3 config.json and technical report; FP8 weights, bf16 MLA latent KV",
    )


TARGETS: dict[str, Target] = {t.name: t for t in (_llama3_8b(), _deepseek_v3())}


def experts_touched(tokens: torch.Tensor, experts: int, k: int) -> torch.Tensor:
    """E_touched(T) = E·(1 − (1 − k/E)^T): expected distinct experts T tokens route to (k of E each)."""
    t = tokens.to(torch.float64)
    if experts == 0:
        return torch.zeros_like(t)
    return experts * (1.0 - (1.0 - k / experts) ** t)


def expert_padded_rows(tokens: torch.Tensor, experts: int, k: int, tile: int = EXPERT_ROW_TILE) -> torch.Tensor:
    """Σ_e E[⌈n_e / tile⌉·tile]: rows the grouped expert GEMMs compute for T tokens, per MoE layer.

    n_e, the tokens routed to expert e, is Binomial(T, k/E); E[⌈n/tile⌉] = Σ_{j≥0} P(n > j·tile).
    The j = 0 term is P(n > 0) = 1 − (1 − k/E)^T exactly (so the sum over experts starts at
    E_touched); the tiers j ≥ 1 use the Poisson(λ = T·k/E) tail P(n > m) = P(m + 1, λ) (regularised
    lower incomplete gamma), accurate for k/E = 1/32. Using the mean count instead (⌈λ/tile⌉)
    would put a spurious 2x jump in the expert FLOPs wherever λ crosses a multiple of the tile.
    """
    t = tokens.to(torch.float64)
    if experts == 0:
        return torch.zeros_like(t)
    lam = t * k / experts
    tiers = int(math.ceil(float(lam.max()) / tile + 8.0 * math.sqrt(float(lam.max()) + 1.0) / tile)) + 2
    j = torch.arange(1, tiers + 1, dtype=torch.float64)
    tail = torch.special.gammainc(j[None, :] * tile + 1.0, lam.reshape(-1, 1)).sum(dim=1).reshape(t.shape)
    return experts * tile * (experts_touched(tokens, experts, k) / experts + tail)


class StepModel:
    """Interface: per-round time tables for a policy's drafter at a concurrency."""

    name: str
    gpus: int
    limit_kind: str = "capacity"  # what bounds the concurrency (for messages)

    def round_seconds(self, drafter: str, gamma: int, concurrency: int, context: float) -> torch.Tensor:
        """[C·(γ+1)+1] fp64: seconds of one round verifying B tokens (entry 0 unused: inf)."""
        raise NotImplementedError

    def max_concurrency(self, context: float, gamma: int) -> int | None:
        """Largest C whose KV cache fits (None: no limit known)."""
        return None

    def describe(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class RooflineStepModel(StepModel):
    """The roofline model of the module docstring for ``target`` on ``gpus`` x ``gpu``."""

    target: Target
    gpu: GPU
    gpus: int
    name: str = ""
    markov_rank: int = MARKOV_RANK
    dspark_layers: int | None = None  # default target.dspark_layers
    overhead_seconds: float | None = None  # default target.overhead_seconds
    # "modelled": the DSpark drafter costs its own roofline (backbone on C·γ positions, full-vocab
    # logits for each, γ Markov steps); "mtp": it costs what the MTP-1 drafter costs, which isolates
    # the scheduler's effect from the drafter's price (tests and --dspark-draft-cost mtp).
    dspark_draft_cost: str = "modelled"

    def _overhead(self) -> float:
        return self.target.overhead_seconds if self.overhead_seconds is None else self.overhead_seconds

    def latency_seconds(self, layer_share: float = 1.0) -> float:
        """Latency that no batch amortises: n_layers·layer_latency + n_moe·2·a2a (dispatch + combine)."""
        tg, g = self.target, self.gpu
        a2a = 0.0
        if tg.experts and self.gpus > 1:
            a2a = A2A_LATENCY_NVLINK if self.gpus <= g.gpus_per_node else A2A_LATENCY_SCALEOUT
        return layer_share * (tg.layers * tg.layer_latency_seconds + tg.moe_layers * 2 * a2a)

    def forward_seconds(self, tokens: torch.Tensor, requests: int, context: float, *, layer_share: float = 1.0,
                        head: bool = True) -> torch.Tensor:
        """Roofline time (no fixed overhead) of running ``tokens`` query tokens through
        ``layer_share`` x the target's layers (+ the LM head), over ``requests`` contexts of
        ``context`` tokens. tokens: int64 tensor of T values. Returns fp64 seconds, same shape."""
        tg, g, n = self.target, self.gpu, self.gpus
        t = tokens.to(torch.float64)
        s = layer_share
        head_params = tg.head_params if head else 0
        always = (tg.always_params - tg.head_params) * s + head_params
        touched = experts_touched(tokens, tg.experts, tg.experts_per_token)
        routed_bytes = tg.moe_layers * s * touched * tg.expert_params * tg.weight_bytes
        kv = requests * context * tg.kv_bytes_per_token * s
        mem_s = (always * tg.weight_bytes + routed_bytes + kv) / (n * g.hbm_bytes_per_s * g.bandwidth_efficiency)

        rows = torch.ceil(t / DENSE_ROW_TILE) * DENSE_ROW_TILE
        flops_w = 2.0 * always * rows
        if tg.experts:
            rows_e = expert_padded_rows(tokens, tg.experts, tg.experts_per_token)
            flops_w = flops_w + 2.0 * tg.moe_layers * s * tg.expert_params * rows_e
        rate_w = g.fp8_flops if tg.matmul_dtype == "fp8" else g.bf16_flops
        flops_a = t * context * tg.attn_flops_per_pair * s
        comp_s = flops_w / (n * rate_w * g.matmul_efficiency) + flops_a / (n * g.bf16_flops * g.matmul_efficiency)

        comm_s = torch.zeros_like(t)
        if tg.experts and n > 1:
            node = min(n, g.gpus_per_node)
            f_nvl, f_ib = (node - 1) / n, (n - node) / n
            per_gpu = (t / n) * tg.experts_per_token * tg.hidden * 3.0 * tg.moe_layers * s
            comm_s = per_gpu * max(f_nvl / g.nvlink_bytes_per_s, f_ib / g.scaleout_bytes_per_s if f_ib else 0.0)
        return torch.maximum(torch.maximum(mem_s, comp_s), comm_s)

    def target_seconds(self, batch: torch.Tensor, concurrency: int, context: float) -> torch.Tensor:
        """t_target(B) = overhead + latency + roofline of the full target on B verify tokens."""
        return self._overhead() + self.latency_seconds() + self.forward_seconds(batch, concurrency, context)

    def draft_seconds(self, drafter: str, gamma: int, concurrency: int, context: float) -> float:
        """t_draft: MTP-1 (``mtp``) or DSpark (``dspark``: backbone on C·γ positions + γ Markov steps)."""
        tg, g = self.target, self.gpu
        if drafter == "dspark" and self.dspark_draft_cost == "mtp":
            drafter = "mtp"
        window = context
        if drafter == "mtp":
            tokens, layers, markov = concurrency, tg.mtp_layers, 0.0
        elif drafter == "dspark":
            tokens = concurrency * gamma
            layers = tg.dspark_layers if self.dspark_layers is None else self.dspark_layers
            # W2 [V, r] bf16 read once per step on every GPU (replicated), plus the step's launches.
            w2 = tg.vocab * self.markov_rank * 2.0 / (g.hbm_bytes_per_s * g.bandwidth_efficiency)
            markov = gamma * (w2 + MARKOV_LAUNCHES_PER_STEP * LAUNCH_SECONDS)
            if tg.dspark_window is not None:
                window = min(context, float(tg.dspark_window))
        else:
            raise ValueError(f"drafter must be 'mtp' or 'dspark', got {drafter!r}")
        share = layers / tg.layers
        backbone = self.forward_seconds(torch.tensor([tokens]), concurrency, window, layer_share=share)
        return float(backbone[0]) + self.latency_seconds(share) + markov

    def round_seconds(self, drafter: str, gamma: int, concurrency: int, context: float) -> torch.Tensor:
        batch = torch.arange(concurrency * (gamma + 1) + 1, dtype=torch.int64)
        out = self.target_seconds(batch, concurrency, context) + self.draft_seconds(drafter, gamma, concurrency,
                                                                                    context)
        out[0] = math.inf
        return out

    limit_kind = "KV cache capacity"

    def max_concurrency(self, context: float, gamma: int) -> int | None:
        """C with weights + C·L̄·kv ≤ 90 % of the instance's HBM (the KV cache must fit); None at L̄ = 0."""
        tg, g = self.target, self.gpu
        per_request = context * tg.kv_bytes_per_token
        if per_request <= 0:
            return None
        free = USABLE_HBM_SHARE * self.gpus * g.hbm_bytes - tg.total_params * tg.weight_bytes
        return max(0, int(free // per_request))

    def describe(self) -> dict:
        tg = self.target
        return {
            "kind": "roofline",
            "name": self.name,
            "gpus": self.gpus,
            "gpu": asdict(self.gpu),
            "target": {**asdict(tg), "always_params": tg.always_params, "active_params": tg.active_params},
            "dspark_layers": tg.dspark_layers if self.dspark_layers is None else self.dspark_layers,
            "overhead_seconds": self._overhead(),
            "dspark_draft_cost": self.dspark_draft_cost,
            "markov_rank": self.markov_rank,
            "dense_row_tile": DENSE_ROW_TILE,
            "expert_row_tile": EXPERT_ROW_TILE,
            "latency_seconds": self.latency_seconds(),
            "a2a_latency_seconds": {"nvlink": A2A_LATENCY_NVLINK, "scaleout": A2A_LATENCY_SCALEOUT},
            "formula": "t = overhead + latency + max(bytes/(G*bw), flops_w/(G*rate_w) + flops_a/(G*rate_a), comm)"
                       " + t_draft",
        }


def _gpus_needed(target: Target, gpu: GPU) -> int:
    """Smallest power of two G with weights ≤ 75 % of G·HBM (the rest for KV and activations)."""
    need = target.total_params * target.weight_bytes
    g = 1
    while need > WEIGHT_SHARE_OF_HBM * g * gpu.hbm_bytes:
        g *= 2
    return g


def profile_names() -> list[str]:
    """Every named roofline profile, ``<target>@<gpu>``."""
    return [f"{t}@{g}" for t in TARGETS for g in GPUS]


def named_profile(name: str, *, dspark_layers: int | None = None, overhead_seconds: float | None = None,
                  dspark_draft_cost: str = "modelled") -> RooflineStepModel:
    """``"llama3-8b@h100"`` etc. -> the roofline model on as many GPUs as the weights need."""
    target_name, _, gpu_name = name.partition("@")
    if target_name not in TARGETS or gpu_name not in GPUS:
        raise ValueError(f"unknown profile {name!r}: choose from {', '.join(profile_names())} "
                         f"or load a measured table with --sps-json")
    if dspark_draft_cost not in ("modelled", "mtp"):
        raise ValueError(f"dspark_draft_cost must be 'modelled' or 'mtp', got {dspark_draft_cost!r}")
    if dspark_layers is not None and dspark_layers < 0:
        raise ValueError(f"dspark_layers must be >= 0, got {dspark_layers}")
    target, gpu = TARGETS[target_name], GPUS[gpu_name]
    return RooflineStepModel(target, gpu, _gpus_needed(target, gpu), name=name, dspark_layers=dspark_layers,
                             overhead_seconds=overhead_seconds, dspark_draft_cost=dspark_draft_cost)


@dataclass(frozen=True)
class TableStepModel(StepModel):
    """A measured table: t_target(B) = 1 / sps[B], plus meta.draft_seconds per drafter."""

    sps: torch.Tensor  # [Bmax+1] fp64, sps[0] = 0
    name: str
    gpus: int = 1
    draft_seconds: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        return self.sps.shape[0] - 1

    def round_seconds(self, drafter: str, gamma: int, concurrency: int, context: float) -> torch.Tensor:
        need = concurrency * (gamma + 1)
        if need > self.max_batch:
            raise ValueError(f"profile {self.name!r}: its SPS table covers B <= {self.max_batch}, but "
                             f"concurrency {concurrency} with γ = {gamma} needs B up to {need}")
        t = 1.0 / self.sps[: need + 1].to(torch.float64)
        t = t + float(self.meta.get("overhead_seconds", 0.0)) \
            + float(self.meta.get("kv_seconds_per_token", 0.0)) * concurrency * context
        t = t + draft_at(self.draft_seconds.get(drafter, 0.0), concurrency)
        t[0] = math.inf
        return t

    limit_kind = "SPS table range"

    def max_concurrency(self, context: float, gamma: int) -> int:
        """C with C·(γ+1) ≤ Bmax: the scheduler needs sps for every batch up to C·(γ+1)."""
        return self.max_batch // (gamma + 1)

    def describe(self) -> dict:
        return {"kind": "table", "name": self.name, "gpus": self.gpus, "draft_seconds": dict(self.draft_seconds),
                "max_batch": self.max_batch, "meta": self.meta}


def draft_at(value, concurrency: int) -> float:
    """A draft_seconds entry at C: the number itself, or the [C, seconds] list interpolated linearly in C."""
    if isinstance(value, (int, float)):
        return float(value)
    points = [(float(c), float(t)) for c, t in value]
    if concurrency <= points[0][0]:
        return points[0][1]
    for (c0, t0), (c1, t1) in zip(points, points[1:]):
        if concurrency <= c1:
            return t0 + (t1 - t0) * (concurrency - c0) / (c1 - c0)
    return points[-1][1]


def _check_meta_seconds(meta: dict, where: str) -> None:
    """meta.overhead_seconds and meta.kv_seconds_per_token, when present, are finite seconds >= 0."""
    for key in ("overhead_seconds", "kv_seconds_per_token"):
        value = meta.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}.{key} must be seconds >= 0, got {value!r}")


def _valid_draft_entry(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value) and value >= 0
    if not isinstance(value, (list, tuple)) or not value:
        return False
    pairs = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in pair):
            return False
        pairs.append(pair)
    cs = [c for c, _ in pairs]
    return all(float(c).is_integer() for c in cs) and all(c >= 1 for c in cs) and all(a < b for a, b in zip(cs, cs[1:])) and all(t >= 0 for _, t in pairs)


def save_sps_json(profile_or_sps, path, *, name: str | None = None, gpus: int = 1,
                  draft_seconds: dict | None = None, meta: dict | None = None) -> pathlib.Path:
    """Write an SPS table as JSON for the simulator; returns the path.

    profile_or_sps: an ``engine.sps_table.SPSProfile`` (its cleaned ``sps``) or a [Bmax+1] tensor /
    list with sps[0] = 0 and sps[B] > 0 steps per second. gpus: GPUs the measured engine spans
    (throughput is divided by it). draft_seconds: {"mtp": s, "dspark": s} drafter time per round
    not inside the table (omit if the table timed whole rounds), each a number or a list of
    [C, seconds] pairs with C ascending (:func:`draft_at`).
    """
    sps = getattr(profile_or_sps, "sps", profile_or_sps)
    values = torch.as_tensor(sps, dtype=torch.float64).reshape(-1)
    _check_sps(values, str(path))
    for key, value in (draft_seconds or {}).items():
        if key not in ("mtp", "dspark") or not _valid_draft_entry(value):
            raise ValueError(f"draft_seconds[{key!r}] must be 'mtp'/'dspark' -> seconds >= 0 or a list of "
                             f"[C, seconds] pairs with C ascending, got {value!r}")
    draft_seconds = {k: (float(v) if isinstance(v, (int, float)) else [[int(c), float(t)] for c, t in v])
                     for k, v in (draft_seconds or {}).items()}
    doc = {"format": SPS_FORMAT, "version": SPS_VERSION, "sps": [float(v) for v in values.tolist()],
           "meta": {**(meta or {}), "name": name or pathlib.Path(os.fspath(path)).stem, "gpus": int(gpus),
                    "draft_seconds": dict(draft_seconds or {})}}
    _check_meta_seconds(doc["meta"], "meta")
    target = pathlib.Path(os.fspath(path))
    target.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return target


def load_sps_json(path) -> TableStepModel:
    """Read a file written by :func:`save_sps_json` into a :class:`TableStepModel`.

    Raises ValueError naming the file when the format tag, version, table or meta is wrong.
    """
    source = pathlib.Path(os.fspath(path))
    try:
        doc = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read an SPS table: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SPS_FORMAT:
        raise ValueError(f"{source}: not an SPS table file (expected \"format\": \"{SPS_FORMAT}\")")
    if doc.get("version") != SPS_VERSION:
        raise ValueError(f"{source}: unsupported SPS table version {doc.get('version')!r}")
    values = doc.get("sps")
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{source}: \"sps\" must be a list of numbers")
    sps = torch.tensor([float(v) for v in values], dtype=torch.float64)
    _check_sps(sps, str(source))
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: \"meta\" must be an object")
    draft = meta.get("draft_seconds") or {}
    if not isinstance(draft, dict) or any(k not in ("mtp", "dspark") for k in draft) \
            or not all(_valid_draft_entry(v) for v in draft.values()):
        raise ValueError(f"{source}: meta.draft_seconds must map 'mtp'/'dspark' to seconds >= 0 or to a list "
                         f"of [C, seconds] pairs with C ascending")
    gpus = meta.get("gpus", 1)
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"{source}: meta.gpus must be a positive integer, got {gpus!r}")
    _check_meta_seconds(meta, f"{source}: meta")
    return TableStepModel(sps, str(meta.get("name") or source.stem), gpus, dict(draft), dict(meta))


def _check_sps(sps: torch.Tensor, where: str) -> None:
    if sps.numel() < 3:
        raise ValueError(f"{where}: sps must cover at least B = 0..2, got {sps.numel()} entries")
    body = sps[1:]
    if not bool(torch.isfinite(sps).all()) or not bool((body > 0).all()):
        raise ValueError(f"{where}: sps[B] must be finite and > 0 for B >= 1")
