"""dspark::markov_draft: fused Markov-head block sampling, confidence and survival."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _checks
from .. import rng
from .._backend import Implementations
from .._op import FLOAT, FLOAT64, INT, INT64, Op, scalar_tensor, tensor, value
from ..reference.markov_draft import Steps, draft_block
from ..reference.markov_draft import markov_draft as _reference


RESULT_TYPES = ("MarkovDraft",)  # exported by dspark_kernels beside markov_draft


class MarkovDraft(NamedTuple):
    tokens: torch.Tensor  # [R, γ] int32
    token_probs: torch.Tensor  # [R, γ] fp32, p_d of each sampled token
    confidence: Optional[torch.Tensor]  # [R, γ] fp32, or None without a confidence head
    survival: Optional[torch.Tensor]  # [R, γ] fp32 cumulative product of confidence
    draft_probs: Optional[torch.Tensor]  # [R, γ, V] fp32 when requested
    draft_logits: Optional[torch.Tensor]  # [R, γ, V] fp32 pre-temperature, when requested


def _check(a, dims):
    if dims["V"] < 1:
        raise ValueError("base_logits must have a vocab dimension of at least 1")
    if dims["G"] >= rng.MAX_POSITION:
        raise ValueError(f"base_logits allows at most {rng.MAX_POSITION - 1} draft positions, got {dims['G']}")
    if a.gate_weight is not None and a.rnn_weight is not None:
        raise ValueError("give gate_weight (gated head) or rnn_weight (RNN head), not both")
    if a.conf_weight is not None and dims["C"] not in (dims["d"], dims["d"] + dims["r"]):
        raise ValueError(f"conf_weight must have shape (d + r,) = ({dims['d'] + dims['r']},) (the confidence head "
                         f"reads [h_k; W1[x_(k-1)]]) or (d,) = ({dims['d']},) (without the Markov feature: h_k "
                         f"alone), got {tuple(a.conf_weight.shape)}")


def _values(a):
    """Value checks (see dspark_kernels._checks for when they run).

    A NaN weight would make the backends disagree (NaN compares differently in
    each argmax), and a (request, step) row whose logits are all -inf has no
    distribution to sample: both are rejected here rather than sampled.
    """
    _checks.ids_in_range("anchor", a.anchor, a.base_logits.shape[2])
    _checks.logits_rows("base_logits", a.base_logits, "(request, step) row")
    for name in ("w1", "w2", "hidden", "conf_weight", "conf_bias", "gate_weight", "gate_bias", "rnn_weight",
                 "rnn_bias"):
        _checks.finite(name, getattr(a, name))
    _checks.temperatures("temperature", a.temperature)
    _checks.temperatures("sts_temperature", a.sts_temperature, zero_ok=False)


def _fake(a):
    num_req, gamma, vocab = a.base_logits.shape
    per_token = (num_req, gamma) if a.conf_weight is not None else (0,)
    new = lambda shape, dtype=torch.float32: a.base_logits.new_empty(shape, dtype=dtype)  # noqa: E731
    return (
        new((num_req, gamma), torch.int32),
        new((num_req, gamma)),
        new(per_token),
        new(per_token),
        new((num_req, gamma, vocab) if a.return_draft_probs else (0,)),
        new((num_req, gamma, vocab) if a.return_draft_logits else (0,)),
    )


def _wrap(out, kw) -> "MarkovDraft":
    conf = kw["conf_weight"] is not None
    return MarkovDraft(out[0], out[1], out[2] if conf else None, out[3] if conf else None,
                       out[4] if kw["return_draft_probs"] else None, out[5] if kw["return_draft_logits"] else None)


_NEEDS_HIDDEN = ("hidden", "the confidence head reads [h_k; W1[x_{k-1}]]")
OP = Op(
    "markov_draft",
    [
        tensor("base_logits", "R, G, V", FLOAT),
        tensor("anchor", "R", INT),
        tensor("w1", "V, r", FLOAT),
        tensor("w2", "V, r", FLOAT),
        tensor("temperature", "R", FLOAT64),
        tensor("seed", "R", INT64),
        scalar_tensor("offset", INT64),
        tensor("hidden", "R, G, d", FLOAT, optional=True),
        tensor("conf_weight", "C", FLOAT, optional=True, requires=(_NEEDS_HIDDEN,)),
        scalar_tensor("conf_bias", FLOAT, optional=True,
                      requires=(("conf_weight", "it is the confidence head's bias"),)),
        tensor("sts_temperature", "G", FLOAT64, optional=True,
               requires=(("conf_weight", "it calibrates the confidence head"),)),
        tensor("gate_weight", "r, d+r", FLOAT, optional=True,
               requires=(("hidden", "the gate reads [h_k; W1[x_{k-1}]]"),)),
        tensor("gate_bias", "r", FLOAT, optional=True, requires=(("gate_weight", "it is the gate's bias"),)),
        tensor("rnn_weight", "3*r, 2*r+d", FLOAT, optional=True,
               requires=(("hidden", "the RNN cell reads [s_{k-1}; W1[x_{k-1}]; h_k]"),)),
        tensor("rnn_bias", "3*r", FLOAT, optional=True, requires=(("rnn_weight", "it is the RNN cell's bias"),)),
        value("return_draft_probs", "bool", default=False),
        value("return_draft_logits", "bool", default=False),
        value("exact", "bool", default=False),
    ],
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    impls=Implementations(
        "markov_draft",
        reference=_reference,
        triton="dspark_kernels.triton.markov_draft:markov_draft",
        cuda="dspark_kernels.ops.markov_draft:markov_draft_cuda",
        not_auto=("cuda",),  # csrc/markov_draft.cu compiles in CI but has not run on a GPU yet
    ),
    fake=_fake,
    check=_check,
    values=_values,
    wrap=_wrap,
)
IMPLS = OP.impls

# --------------------------------------------------------------------------- the CUDA backend: csrc kernels, shared loop

# The extension's kernels (csrc/markov_draft.cu via csrc/torch_bindings.cpp): one step over the
# vocabulary, and draft_probs from the stored z. The loop around them is reference.draft_block.
torch.library.define(
    "dspark::markov_step_cuda",
    "(Tensor u, Tensor e, Tensor w2, Tensor temperature, Tensor seed, Tensor offset, Tensor(a!) tokens, "
    "Tensor(b!) token_probs, Tensor(c!) logits, int step) -> ()",
)
torch.library.define(
    "dspark::markov_probs_cuda", "(Tensor logits, Tensor temperature, Tensor tokens, Tensor(a!) probs) -> ()"
)


def _cuda_prepare(a):
    return a.temperature.float().contiguous(), a.seed.contiguous(), a.base_logits.new_empty((0,), dtype=torch.float32)


def _cuda_step(a, ws, k, e, block):
    temperature, seed, no_z = ws
    torch.ops.dspark.markov_step_cuda(a.base_logits[:, k], e, a.w2, temperature, seed, a.offset, block.tokens,
                                      block.token_probs, block.z[:, k] if block.z is not None else no_z, k)


def _cuda_probs(a, ws, block):
    torch.ops.dspark.markov_probs_cuda(block.z, ws[0], block.tokens, block.draft_probs)


_CUDA_STEPS = Steps(_cuda_prepare, _cuda_step, _cuda_probs)


def markov_draft_cuda(a) -> tuple:
    return draft_block(a, _CUDA_STEPS)


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
    exact: bool = False,
    backend: str | None = None,
) -> MarkovDraft:
    """Sample a block of γ draft tokens with the DSpark Markov head.

    Math (x_0 = anchor, k = 1..γ, DSpark eq. 4-7 as DeepSpec implements them): the head input is
    e_k = W1[x_{k-1}] (vanilla); σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}] (gated, gate_weight
    given); or, for the RNN head (rnn_weight given, DeepSpec's RNNHead), [g; c; o] =
    Wr·[s_{k-1}; W1[x_{k-1}]; h_k] + br (rows in that order), s_k = σ(g) ⊙ s_{k-1} + (1 − σ(g)) ⊙
    tanh(c), e_k = tanh(o), s_0 = 0. Then z_k = U_k + W2·e_k; x_k ~ softmax(z_k / T) (argmax when
    T < 1e-5, e.g. 0); p_d(x_k) = softmax(z_k / T)[x_k]; c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k)
    (w·h_k without the Markov feature: conf_weight [d]); a_k = Π_{i<=k} c_i. Sampling is exact
    (Gumbel-max on the DRAFT Philox stream, position k-1), so the same seed and offset give the same
    tokens.

    Args:
        base_logits: U [R, γ, V] bf16/fp16/fp32 from the parallel backbone.
        anchor: [R] int32/int64 token ids x_0 in [0, V).
        w1: [V, r] embedding table. w2: [V, r] nn.Linear(r, V).weight.
        temperature: [R] float; T < 1e-5 (e.g. 0) = greedy. seed: [R] int64. offset: [] int64.
        hidden: [R, γ, d] backbone hidden states (confidence, gated and RNN heads).
        conf_weight: [d + r] (or [d] without the Markov feature), conf_bias: [] or [1]: confidence head.
        sts_temperature: [γ] > 0, per-position calibration temperatures.
        gate_weight: [r, d + r], gate_bias: [r]: gated head.
        rnn_weight: [3r, 2r + d] (DeepSpec's joint_proj.weight, no transpose), rnn_bias: [3r]: RNN head.
        return_draft_probs / return_draft_logits: also return softmax(z_k / T)
            (one-hot for greedy rows) / z_k, [R, γ, V] fp32, for verification.
        exact: bitwise the reference (the Triton backend then runs the head in torch and e·W2ᵀ in fp32
            IEEE dots: the token-for-token mode). Default False: Triton's fused fast path, e·W2ᵀ on the
            tensor cores with W2's dtype as operands (bf16/fp16; tf32 for fp32 weights) and fp32
            accumulation, the head and confidence fused, 2 launches per draft step. It differs from the
            reference by that rounding only: token_probs, draft_probs and draft_logits are always exactly
            the distribution each token was drawn from, which is all that verification needs. The
            reference and CUDA backends are exact either way.
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        MarkovDraft(tokens [R, γ] int32, token_probs [R, γ] fp32,
        confidence [R, γ] fp32 | None, survival [R, γ] fp32 | None,
        draft_probs [R, γ, V] fp32 | None, draft_logits [R, γ, V] fp32 | None).

    Examples:
        A greedy vanilla head: each token is the argmax of U_k + W2·W1[x_{k-1}].

        >>> import torch, dspark_kernels as dk
        >>> V, r = 4, 2
        >>> w1 = torch.eye(V, r); w2 = torch.tensor([[0.0, 0.0], [9.0, 0.0], [0.0, 9.0], [0.0, 0.0]])
        >>> out = dk.markov_draft(torch.zeros(1, 3, V), torch.tensor([0]), w1, w2, torch.tensor([0.0]),
        ...                       torch.tensor([1]), torch.tensor(0))
        >>> out.tokens.tolist(), out.token_probs.tolist(), out.confidence
        ([[1, 2, 0]], [[1.0, 1.0, 1.0]], None)
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of markov_draft, gated head with confidence (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(0)
    R, G, V, r, d = 3, 4, 11, 5, 6
    x = dict(base_logits=torch.randn(R, G, V, generator=g), anchor=torch.tensor([1, 2, 3]),
             w1=torch.randn(V, r, generator=g), w2=torch.randn(V, r, generator=g),
             temperature=torch.tensor([1.0, 0.0, 0.5]), seed=torch.arange(R, dtype=torch.int64),
             offset=torch.tensor(7, dtype=torch.int64), hidden=torch.randn(R, G, d, generator=g),
             conf_weight=torch.randn(d + r, generator=g), conf_bias=torch.tensor(0.1),
             sts_temperature=torch.full((G,), 1.3), gate_weight=torch.randn(r, d + r, generator=g),
             gate_bias=torch.randn(r, generator=g))
    return dict({k: v.to(device) for k, v in x.items()}, return_draft_probs=True, return_draft_logits=True)
