"""Reference Markov-head block drafting (DSpark eq. 4-7; DeepSpec markov_head.py).

The parallel backbone gives base logits U_k for the γ draft positions; the
Markov head adds a low-rank term that depends on the previous token, so the
block is sampled sequentially, x_0 being the anchor:

    e_k      = W1[x_{k-1}]                                   vanilla head
    e_k      = σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}]   gated head
    s_k      = tanh(Wr·[W1[x_{k-1}]; s_{k-1}] + br), s_0 = 0,
    e_k      = s_k                                           RNN head
    z_k      = U_k + W2·e_k                                  draft logits [V]
    x_k      ~ softmax(z_k / T)      (Gumbel-max on stream DRAFT, position k)
               argmax z_k when T < 1e-5 (e.g. 0)
    p_d(x_k) = softmax(z_k / T)[x_k]  (1 for greedy rows)
    c_k      = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k)           confidence, τ = STS temps
    a_k      = Π_{i<=k} c_i                                  survival

W1 is the embedding [V, r], W2 the nn.Linear(r, V) weight [V, r], Wg [r, d+r],
Wr [r, 2r]. All math in fp32.
"""

from __future__ import annotations

import torch

from .. import rng
from .sampling import GREEDY_TEMPERATURE, greedy_onehot, gumbel_sample_logits


def markov_draft(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    hidden: torch.Tensor | None,
    conf_weight: torch.Tensor | None,
    conf_bias: torch.Tensor | None,
    sts_temperature: torch.Tensor | None,
    gate_weight: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    rnn_weight: torch.Tensor | None,
    rnn_bias: torch.Tensor | None,
    return_draft_probs: bool,
    return_draft_logits: bool,
):
    num_req, gamma, vocab = base_logits.shape
    device = base_logits.device
    f32 = dict(dtype=torch.float32, device=device)
    w1 = w1.float()
    w2 = w2.float()
    temperature = temperature.float()
    greedy = temperature < GREEDY_TEMPERATURE
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)

    tokens = torch.empty((num_req, gamma), dtype=torch.int32, device=device)
    token_probs = torch.empty((num_req, gamma), **f32)
    with_conf = conf_weight is not None
    confidence = torch.empty((num_req, gamma), **f32) if with_conf else torch.empty(0, **f32)
    draft_probs = torch.empty((num_req, gamma, vocab), **f32) if return_draft_probs else torch.empty(0, **f32)
    draft_logits = torch.empty((num_req, gamma, vocab), **f32) if return_draft_logits else torch.empty(0, **f32)

    prev = anchor.to(torch.int64)
    state = torch.zeros((num_req, w1.shape[1]), **f32) if rnn_weight is not None else None
    for k in range(gamma):
        emb = w1[prev]  # [R, r]
        h_k = hidden[:, k].float() if hidden is not None else None
        if gate_weight is not None:
            gate = torch.sigmoid(torch.cat([h_k, emb], dim=-1) @ gate_weight.float().T + _bias_or_zero(gate_bias))
            e = gate * emb
        elif rnn_weight is not None:
            state = torch.tanh(torch.cat([emb, state], dim=-1) @ rnn_weight.float().T + _bias_or_zero(rnn_bias))
            e = state
        else:
            e = emb
        z = base_logits[:, k].float() + e @ w2.T  # [R, V]
        x = gumbel_sample_logits(z, temperature, seed, offset, rng.STREAM_DRAFT, k)
        probs = torch.where(greedy[:, None], greedy_onehot(z), torch.softmax(z / safe_t[:, None], dim=-1))
        tokens[:, k] = x.to(torch.int32)
        token_probs[:, k] = probs.gather(-1, x[:, None]).squeeze(-1)
        if with_conf:
            logit_c = torch.cat([h_k, emb], dim=-1) @ conf_weight.float()
            if conf_bias is not None:
                logit_c = logit_c + conf_bias.float().reshape(())
            if sts_temperature is not None:
                logit_c = logit_c / sts_temperature[k].float()
            confidence[:, k] = torch.sigmoid(logit_c)
        if return_draft_probs:
            draft_probs[:, k] = probs
        if return_draft_logits:
            draft_logits[:, k] = z
        prev = x
    survival = torch.cumprod(confidence, dim=1) if with_conf else torch.empty(0, **f32)
    return tokens, token_probs, confidence, survival, draft_probs, draft_logits


def _bias_or_zero(bias: torch.Tensor | None) -> torch.Tensor | float:
    """An optional bias in fp32, or 0 when the head has none."""
    return bias.float() if bias is not None else 0.0
