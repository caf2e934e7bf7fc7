"""dspark::markov_draft: fused Markov-head block sampling, confidence and survival."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from .. import rng
from .._backend import OpBackends
from ..reference.markov_draft import markov_draft as _reference

BACKENDS = OpBackends(
    name="markov_draft",
    reference=_reference,
    triton="dspark_kernels.triton.markov_draft:markov_draft",
    cuda="markov_draft_cuda",
    # csrc/markov_draft.cu compiles in CI but has not run on a GPU yet: explicit backend="cuda" only.
    not_auto=("cuda",),
)

torch.library.define(
    "dspark::markov_draft_cuda",
    "(Tensor base_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor temperature, Tensor seed, "
    "Tensor offset, Tensor? hidden, Tensor? conf_weight, Tensor? conf_bias, "
    "Tensor? sts_temperature, Tensor? gate_weight, Tensor? gate_bias, Tensor? rnn_weight, "
    "Tensor? rnn_bias, bool return_draft_probs, bool return_draft_logits) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


class MarkovDraft(NamedTuple):
    tokens: torch.Tensor  # [R, γ] int32
    token_probs: torch.Tensor  # [R, γ] fp32, p_d of each sampled token
    confidence: Optional[torch.Tensor]  # [R, γ] fp32, or None without a confidence head
    survival: Optional[torch.Tensor]  # [R, γ] fp32 cumulative product of confidence
    draft_probs: Optional[torch.Tensor]  # [R, γ, V] fp32 when requested
    draft_logits: Optional[torch.Tensor]  # [R, γ, V] fp32 pre-temperature, when requested


def _check(base_logits, anchor, w1, w2, temperature, seed, offset, hidden, conf_weight, conf_bias,
           sts_temperature, gate_weight, gate_bias, rnn_weight, rnn_bias):
    V.tensor("base_logits", base_logits, ndim=3, dtypes=V.FLOAT_DTYPES)
    num_req, gamma, vocab = base_logits.shape
    if vocab < 1:
        raise ValueError("base_logits must have a vocab dimension of at least 1")
    if gamma >= rng.MAX_POSITION:
        raise ValueError(f"base_logits allows at most {rng.MAX_POSITION - 1} draft positions, got {gamma}")
    V.tensor("anchor", anchor, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("anchor", anchor, (num_req,))
    V.tensor("w1", w1, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("w2", w2, ndim=2, dtypes=V.FLOAT_DTYPES)
    if w1.shape[0] != vocab:
        raise ValueError(f"w1 (embedding) has {w1.shape[0]} rows but base_logits has vocab size {vocab}")
    if w2.shape[0] != vocab:
        raise ValueError(f"w2 (nn.Linear(r, V).weight) has {w2.shape[0]} rows but base_logits has vocab size {vocab}")
    rank = w1.shape[1]
    if w2.shape[1] != rank:
        raise ValueError(f"w2 has rank {w2.shape[1]} but w1 has rank {rank}")
    V.tensor("temperature", temperature, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    V.shape("temperature", temperature, (num_req,))
    V.tensor("seed", seed, ndim=1, dtypes=(torch.int64,))
    V.shape("seed", seed, (num_req,))
    V.scalar_tensor("offset", offset, (torch.int64,))
    d = None
    if hidden is not None:
        V.tensor("hidden", hidden, ndim=3, dtypes=V.FLOAT_DTYPES)
        if tuple(hidden.shape[:2]) != (num_req, gamma):
            raise ValueError(f"hidden must have shape ({num_req}, {gamma}, d), got {tuple(hidden.shape)}")
        d = hidden.shape[2]
    if conf_weight is not None:
        if hidden is None:
            raise ValueError("conf_weight needs hidden: the confidence head reads [h_k; W1[x_{k-1}]]")
        V.tensor("conf_weight", conf_weight, ndim=1, dtypes=V.FLOAT_DTYPES)
        V.shape("conf_weight", conf_weight, (d + rank,))
    elif conf_bias is not None or sts_temperature is not None:
        raise ValueError("conf_bias and sts_temperature need conf_weight (the confidence head)")
    if conf_bias is not None:
        V.tensor("conf_bias", conf_bias, dtypes=V.FLOAT_DTYPES)
        if conf_bias.numel() != 1 or conf_bias.dim() > 1:
            raise ValueError(f"conf_bias must be a 0-d or one-element tensor, got shape {tuple(conf_bias.shape)}")
    if sts_temperature is not None:
        V.tensor("sts_temperature", sts_temperature, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
        V.shape("sts_temperature", sts_temperature, (gamma,))
    if gate_weight is not None and rnn_weight is not None:
        raise ValueError("give gate_weight (gated head) or rnn_weight (RNN head), not both")
    if gate_weight is not None:
        if hidden is None:
            raise ValueError("gate_weight needs hidden: the gate reads [h_k; W1[x_{k-1}]]")
        V.tensor("gate_weight", gate_weight, ndim=2, dtypes=V.FLOAT_DTYPES)
        V.shape("gate_weight", gate_weight, (rank, d + rank))
    elif gate_bias is not None:
        raise ValueError("gate_bias needs gate_weight")
    if gate_bias is not None:
        V.tensor("gate_bias", gate_bias, ndim=1, dtypes=V.FLOAT_DTYPES)
        V.shape("gate_bias", gate_bias, (rank,))
    if rnn_weight is not None:
        V.tensor("rnn_weight", rnn_weight, ndim=2, dtypes=V.FLOAT_DTYPES)
        V.shape("rnn_weight", rnn_weight, (rank, 2 * rank))
    elif rnn_bias is not None:
        raise ValueError("rnn_bias needs rnn_weight")
    if rnn_bias is not None:
        V.tensor("rnn_bias", rnn_bias, ndim=1, dtypes=V.FLOAT_DTYPES)
        V.shape("rnn_bias", rnn_bias, (rank,))
    V.same_device(
        "base_logits", base_logits, anchor=anchor, w1=w1, w2=w2, temperature=temperature, seed=seed,
        offset=offset, hidden=hidden, conf_weight=conf_weight, conf_bias=conf_bias,
        sts_temperature=sts_temperature, gate_weight=gate_weight, gate_bias=gate_bias,
        rnn_weight=rnn_weight, rnn_bias=rnn_bias,
    )


def _check_values(base_logits, anchor, temperature, sts_temperature, **weights):
    """Checks that read values: always on CPU, on CUDA only in debug mode.

    A NaN weight would make the backends disagree (NaN compares differently in
    each argmax), and a (request, step) row whose logits are all -inf has no
    distribution to sample: both are rejected here rather than sampled.
    """
    V.ids_in_range("anchor", anchor, base_logits.shape[2])
    V.not_nan("base_logits", base_logits)
    if base_logits.numel() and V.value_checks(base_logits):
        if bool(torch.isposinf(base_logits).any()):
            raise ValueError("base_logits contains +Inf")
        if bool((base_logits.amax(dim=-1) == float("-inf")).any()):
            raise ValueError("base_logits has a (request, step) row with no finite logit")
    for name, w in weights.items():
        if w is not None:
            V.finite(name, w)
    V.finite("temperature", temperature)
    if temperature.numel() and V.value_checks(temperature) and bool((temperature < 0).any()):
        raise ValueError("temperature must be >= 0 (0 means greedy)")
    if sts_temperature is not None:
        V.finite("sts_temperature", sts_temperature)
        if sts_temperature.numel() and V.value_checks(sts_temperature) and bool((sts_temperature <= 0).any()):
            raise ValueError("sts_temperature must be > 0")


@torch.library.custom_op("dspark::markov_draft", mutates_args=(), device_types=("cpu", "cuda"))
def _op(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    hidden: Optional[torch.Tensor],
    conf_weight: Optional[torch.Tensor],
    conf_bias: Optional[torch.Tensor],
    sts_temperature: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    rnn_weight: Optional[torch.Tensor],
    rnn_bias: Optional[torch.Tensor],
    return_draft_probs: bool,
    return_draft_logits: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = (hidden, conf_weight, conf_bias, sts_temperature, gate_weight, gate_bias, rnn_weight, rnn_bias)
    _check(base_logits, anchor, w1, w2, temperature, seed, offset, *weights)
    _check_values(base_logits, anchor, temperature, sts_temperature, w1=w1, w2=w2, hidden=hidden,
                  conf_weight=conf_weight, conf_bias=conf_bias, gate_weight=gate_weight, gate_bias=gate_bias,
                  rnn_weight=rnn_weight, rnn_bias=rnn_bias)
    return BACKENDS.run(
        backend, base_logits.device.type, base_logits, anchor, w1, w2, temperature, seed,
        offset.reshape(()), *weights, return_draft_probs, return_draft_logits,
    )


@_op.register_fake
def _fake(base_logits, anchor, w1, w2, temperature, seed, offset, hidden, conf_weight, conf_bias,
          sts_temperature, gate_weight, gate_bias, rnn_weight, rnn_bias, return_draft_probs,
          return_draft_logits, backend):
    _check(base_logits, anchor, w1, w2, temperature, seed, offset, hidden, conf_weight, conf_bias,
           sts_temperature, gate_weight, gate_bias, rnn_weight, rnn_bias)
    num_req, gamma, vocab = base_logits.shape
    f32 = dict(dtype=torch.float32)
    with_conf = conf_weight is not None
    per_token = (num_req, gamma) if with_conf else (0,)
    return (
        base_logits.new_empty((num_req, gamma), dtype=torch.int32),
        base_logits.new_empty((num_req, gamma), **f32),
        base_logits.new_empty(per_token, **f32),
        base_logits.new_empty(per_token, **f32),
        base_logits.new_empty((num_req, gamma, vocab) if return_draft_probs else (0,), **f32),
        base_logits.new_empty((num_req, gamma, vocab) if return_draft_logits else (0,), **f32),
    )


def markov_draft(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    conf_weight: torch.Tensor | None = None,
    conf_bias: torch.Tensor | None = None,
    sts_temperature: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    rnn_weight: torch.Tensor | None = None,
    rnn_bias: torch.Tensor | None = None,
    return_draft_probs: bool = False,
    return_draft_logits: bool = False,
    backend: str | None = None,
) -> MarkovDraft:
    """Sample a block of γ draft tokens with the DSpark Markov head.

    Math (x_0 = anchor, k = 1..γ): e_k = W1[x_{k-1}] (vanilla), or
    σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}] (gated, gate_weight given), or
    s_k = tanh(Wr·[W1[x_{k-1}]; s_{k-1}] + br) with s_0 = 0 (RNN, rnn_weight
    given); z_k = U_k + W2·e_k; x_k ~ softmax(z_k / T) (argmax when T < 1e-5, e.g. 0);
    p_d(x_k) = softmax(z_k / T)[x_k]; c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k);
    a_k = Π_{i<=k} c_i. Sampling is exact (Gumbel-max on the DRAFT Philox
    stream, position k-1), so the same seed and offset give the same tokens.

    Args:
        base_logits: U [R, γ, V] bf16/fp16/fp32 from the parallel backbone.
        anchor: [R] int32/int64 token ids x_0 in [0, V).
        w1: [V, r] embedding table. w2: [V, r] nn.Linear(r, V).weight.
        temperature: [R] float; T < 1e-5 (e.g. 0) = greedy. seed: [R] int64. offset: [] int64.
        hidden: [R, γ, d] backbone hidden states (confidence and gated heads).
        conf_weight: [d + r], conf_bias: [] or [1]: confidence head.
        sts_temperature: [γ] > 0, per-position calibration temperatures.
        gate_weight: [r, d + r], gate_bias: [r]: gated head.
        rnn_weight: [r, 2r], rnn_bias: [r]: RNN head.
        return_draft_probs / return_draft_logits: also return softmax(z_k / T)
            (one-hot for greedy rows) / z_k, [R, γ, V] fp32, for verification.
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        MarkovDraft(tokens [R, γ] int32, token_probs [R, γ] fp32,
        confidence [R, γ] fp32 | None, survival [R, γ] fp32 | None,
        draft_probs [R, γ, V] fp32 | None, draft_logits [R, γ, V] fp32 | None).
    """
    V.tensor_args(
        ("hidden", "conf_weight", "conf_bias", "sts_temperature", "gate_weight", "gate_bias", "rnn_weight",
         "rnn_bias"),
        base_logits=base_logits, anchor=anchor, w1=w1, w2=w2, temperature=temperature, seed=seed, offset=offset,
        hidden=hidden, conf_weight=conf_weight, conf_bias=conf_bias, sts_temperature=sts_temperature,
        gate_weight=gate_weight, gate_bias=gate_bias, rnn_weight=rnn_weight, rnn_bias=rnn_bias,
    )
    out = torch.ops.dspark.markov_draft(
        base_logits, anchor, w1, w2, temperature, seed, offset, hidden, conf_weight, conf_bias,
        sts_temperature, gate_weight, gate_bias, rnn_weight, rnn_bias, bool(return_draft_probs),
        bool(return_draft_logits), backend or "",
    )
    with_conf = conf_weight is not None
    return MarkovDraft(
        out[0],
        out[1],
        out[2] if with_conf else None,
        out[3] if with_conf else None,
        out[4] if return_draft_probs else None,
        out[5] if return_draft_logits else None,
    )
