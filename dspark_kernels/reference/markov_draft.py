"""Reference markov_draft: implements dspark_kernels.markov_draft (DSpark eq. 4-7, DeepSpec markov_head.py).

The block loop lives here once and every backend runs it: ``draft_block(a,
steps)`` computes, per draft step k, the head input e_k and the confidence
c_k (O(R·r·d) torch ops in fp32), hands e_k to ``steps.step`` (the
O(R·V·r) work: z_k = U_k + W2·e_k and the exact draw of x_k from softmax(z_k
/ T)), feeds x_k to step k+1, and ends with ``steps.probs`` (draft_probs from
the stored z) and the survival cumprod. The reference's steps are torch ops
in fp32; the Triton and CUDA backends pass their kernels, so the head input,
the confidence and the loop are the same code, bit for bit, on every backend.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .. import rng
from .sampling import gumbel_sample_logits, inverse_temperature


class Block:
    """Outputs being filled by the loop: tokens / token_probs [R, γ], confidence [R, γ] or empty,
    z [R, γ, V] fp32 (kept when draft logits or probs were asked for, else None), draft_probs."""

    def __init__(self, a):
        num_req, gamma, vocab = a.base_logits.shape
        device = a.base_logits.device
        f32 = dict(dtype=torch.float32, device=device)
        self.tokens = torch.empty((num_req, gamma), dtype=torch.int32, device=device)
        self.token_probs = torch.empty((num_req, gamma), **f32)
        self.confidence = torch.empty((num_req, gamma), **f32) if a.conf_weight is not None else torch.empty(0, **f32)
        keep_z = a.return_draft_logits or a.return_draft_probs
        self.z = torch.empty((num_req, gamma, vocab), **f32) if keep_z else None
        self.draft_probs = torch.empty((num_req, gamma, vocab), **f32) if a.return_draft_probs else torch.empty(0, **f32)

    def outputs(self, a) -> tuple:
        f32 = dict(dtype=torch.float32, device=self.tokens.device)
        survival = torch.cumprod(self.confidence, dim=1) if a.conf_weight is not None else torch.empty(0, **f32)
        logits = self.z if a.return_draft_logits else torch.empty(0, **f32)
        return self.tokens, self.token_probs, self.confidence, survival, self.draft_probs, logits


class Steps(NamedTuple):
    """A backend's vocabulary-wide work. prepare(a) -> workspace, once per call;
    step(a, ws, k, e, block): x_k, p_d(x_k) (and z_k if block.z) into block;
    probs(a, ws, block): block.draft_probs from block.z."""

    prepare: Callable
    step: Callable
    probs: Callable


def head_input(a, k: int, prev: torch.Tensor, state: torch.Tensor | None):
    """(e_k [R, r] fp32, the RNN state after step k, W1[x_{k-1}] fp32)."""
    emb = a.w1[prev].float()
    if a.gate_weight is not None:
        x = torch.cat([a.hidden[:, k].float(), emb], dim=-1) @ a.gate_weight.float().T
        if a.gate_bias is not None:
            x = x + a.gate_bias.float()
        return torch.sigmoid(x) * emb, state, emb
    if a.rnn_weight is not None:
        x = torch.cat([state, emb, a.hidden[:, k].float()], dim=-1) @ a.rnn_weight.float().T
        if a.rnn_bias is not None:
            x = x + a.rnn_bias.float()
        g, c, o = x.chunk(3, dim=-1)  # rows of joint_proj: gate, candidate, output
        gate = torch.sigmoid(g)
        state = gate * state + (1.0 - gate) * torch.tanh(c)
        return torch.tanh(o), state, emb
    return emb, state, emb


def confidence(a, k: int, emb: torch.Tensor) -> torch.Tensor:
    """c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k) (w·h_k when conf_weight has no Markov part), [R] fp32."""
    h = a.hidden[:, k].float()
    x = h if a.conf_weight.shape[0] == h.shape[-1] else torch.cat([h, emb], dim=-1)
    logit = x @ a.conf_weight.float()
    if a.conf_bias is not None:
        logit = logit + a.conf_bias.float().reshape(())
    if a.sts_temperature is not None:
        logit = logit / a.sts_temperature[k].float()
    return torch.sigmoid(logit)


def draft_block(a, steps: Steps) -> tuple:
    """The Markov block loop shared by every backend (see the module docstring)."""
    block = Block(a)
    num_req, gamma, _ = a.base_logits.shape
    if num_req == 0 or gamma == 0:
        return block.outputs(a)
    ws = steps.prepare(a)
    # Unchecked path: an anchor outside [0, V) is clamped, never an out-of-bounds read of W1.
    prev = a.anchor.to(torch.int64).clamp(0, a.base_logits.shape[2] - 1)
    state = torch.zeros((num_req, a.w1.shape[1]), dtype=torch.float32, device=prev.device) \
        if a.rnn_weight is not None else None
    for k in range(gamma):
        e, state, emb = head_input(a, k, prev, state)
        if a.conf_weight is not None:
            block.confidence[:, k] = confidence(a, k, emb)
        steps.step(a, ws, k, e.contiguous(), block)
        prev = block.tokens[:, k].to(torch.int64)
    if a.return_draft_probs:
        steps.probs(a, ws, block)
    return block.outputs(a)


# --------------------------------------------------------------------------- the reference's steps: torch, fp32


class _Workspace(NamedTuple):
    w2: torch.Tensor  # [V, r] fp32
    temperature: torch.Tensor  # [R] fp32
    greedy: torch.Tensor  # [R] bool
    inv_t: torch.Tensor  # [R] fp32 1 / T, 1 on greedy rows


def _prepare(a) -> _Workspace:
    temperature = a.temperature.float()
    greedy, inv_t = inverse_temperature(temperature)
    return _Workspace(a.w2.float(), temperature, greedy, inv_t)


def _step(a, ws: _Workspace, k: int, e: torch.Tensor, block: Block) -> None:
    z = a.base_logits[:, k].float() + e @ ws.w2.T  # [R, V]
    x = gumbel_sample_logits(z, ws.temperature, a.seed, a.offset, rng.STREAM_DRAFT, k)
    p_x = torch.softmax(z * ws.inv_t[:, None], dim=-1).gather(-1, x[:, None]).squeeze(-1)
    block.tokens[:, k] = x.to(torch.int32)
    block.token_probs[:, k] = torch.where(ws.greedy, torch.ones_like(p_x), p_x)
    if block.z is not None:
        block.z[:, k] = z


def _probs(a, ws: _Workspace, block: Block) -> None:
    """softmax(z_k · (1 / T)), one-hot at x_k on greedy rows (x_k is then the first argmax of z_k)."""
    probs = torch.softmax(block.z * ws.inv_t[:, None, None], dim=-1)
    onehot = torch.zeros_like(probs).scatter_(-1, block.tokens[..., None].long(), 1.0)
    block.draft_probs.copy_(torch.where(ws.greedy[:, None, None], onehot, probs))


STEPS = Steps(_prepare, _step, _probs)


def markov_draft(a) -> tuple:
    return draft_block(a, STEPS)
