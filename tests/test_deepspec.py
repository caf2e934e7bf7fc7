"""DeepSpec checkpoints (dspark_kernels.engine.deepspec): load, draft, errors, stored STS, the CLI.

Every checkpoint here is written by the test in DeepSpec's save_pretrained
format: safetensors with DeepSpec's keys (bf16, tiny sizes, plus backbone /
lm_head / embed_tokens keys the loader must skip) and a config.json. The
drafts are checked against the DSpark equations written out below in
float64, teacher-forced along the op's own tokens, on every backend.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dspark_kernels.ops.markov_draft as md_op
from dspark_kernels.engine import deepspec
from dspark_kernels.engine.calibration import STS_FILENAME, fit_sts, load_sts, save_sts, survival_from_logits
from dspark_kernels.engine.deepspec import CheckpointError, DraftHead, load_deepspec
from support import DEVICE, available_backends, to_cpu, to_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, R_RANK, D_HID, GAMMA = 13, 5, 6, 4
BACKENDS = available_backends(md_op)
LOGGER = "dspark_kernels.engine.deepspec"
HEAD_TYPES = ("vanilla", "gated", "rnn")
# Keys of the draft model that are not ours: the loader skips them with one log line.
BACKBONE = {"embed_tokens.weight": (V, D_HID), "lm_head.weight": (V, D_HID), "fc.weight": (D_HID, 2 * D_HID),
            "layers.0.self_attn.q_proj.weight": (D_HID, D_HID), "layers.0.mlp.up_proj.weight": (8, D_HID),
            "norm.weight": (D_HID,)}


# --------------------------------------------------------------------------- writing checkpoints


def make_config(head_type="gated", conf="markov", softcap=None, **over):
    """config.json of a DeepSpec DSpark draft. conf: "markov" (with the Markov feature), "plain", None."""
    cfg = dict(architectures=["Qwen3DSparkModel"], block_size=GAMMA, markov_rank=R_RANK, markov_head_type=head_type,
               enable_confidence_head=conf is not None, confidence_head_with_markov=conf != "plain",
               vocab_size=V, hidden_size=D_HID, final_logit_softcapping=softcap, num_hidden_layers=1,
               torch_dtype="bfloat16")
    cfg.update(over)
    return cfg


def make_state(head_type="gated", conf="markov", seed=0, backbone=True):
    """DeepSpec's keys and shapes, bf16 (as save_pretrained writes them)."""
    g = torch.Generator().manual_seed(seed)
    r, d = R_RANK, D_HID
    shapes = {"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r)}
    if head_type == "gated":
        shapes.update({"markov_head.gate_proj.weight": (r, d + r), "markov_head.gate_proj.bias": (r,)})
    if head_type == "rnn":
        shapes.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + d), "markov_head.joint_proj.bias": (3 * r,)})
    if conf is not None:
        shapes.update({"confidence_head.proj.weight": (1, d + r if conf == "markov" else d),
                       "confidence_head.proj.bias": (1,)})
    if backbone:
        shapes.update(BACKBONE)
    scale = {"markov_head.markov_w2.weight": 1.5, "markov_head.markov_w1.weight": 1.0}
    return {k: (torch.randn(shape, generator=g) * scale.get(k, 0.7)).to(torch.bfloat16) for k, shape in shapes.items()}


def write_checkpoint(directory, state, config, shards=1, index=True):
    """save_pretrained's layout: config.json + model.safetensors, or model-0000i-of-0000n.safetensors shards
    (with model.safetensors.index.json when index)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(directory, "model.safetensors"))
        return directory
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    if index:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return directory


# --------------------------------------------------------------------------- the equations, float64


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def law(state, config, base, anchor, tokens, hidden, temperature, sts=None):
    """DSpark eq. 4-7 (DeepSpec's heads) in float64 along the given tokens (teacher forcing).

    x_0 = anchor, x_k = tokens[:, k-1]. U_k ← c·tanh(U_k / c) with a softcap c.
    e_k = W1[x_{k-1}] (vanilla); σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}] (gated);
    RNN: [g; c; o] = Wj·[s_{k-1}; W1[x_{k-1}]; h_k] + bj, s_k = σ(g) ⊙ s_{k-1} + (1 − σ(g)) ⊙ tanh(c),
    e_k = tanh(o), s_0 = 0. z_k = U_k + W2·e_k; p_k = softmax(z_k / T) (one-hot argmax when T = 0).
    Confidence: c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k), or w·h_k without the Markov feature.
    Returns z [R, γ, V], p [R, γ, V], conf [R, γ] or None, survival [R, γ] or None.
    """
    f = {k: v.double() for k, v in state.items()}
    w1, w2 = f["markov_head.markov_w1.weight"], f["markov_head.markov_w2.weight"]
    u = base.double()
    if config.get("final_logit_softcapping") is not None:
        cap = float(config["final_logit_softcapping"])
        u = cap * torch.tanh(u / cap)
    num, gamma, _ = u.shape
    r = w1.shape[1]
    h = hidden.double() if hidden is not None else None
    s = torch.zeros(num, r, dtype=torch.float64)
    z = torch.empty(u.shape, dtype=torch.float64)
    conf = torch.empty(num, gamma, dtype=torch.float64)
    prev = anchor.long()
    for k in range(gamma):
        emb = w1[prev]
        kind = config["markov_head_type"]
        if kind == "vanilla":
            e = emb
        elif kind == "gated":
            gate = sigmoid(torch.cat([h[:, k], emb], -1) @ f["markov_head.gate_proj.weight"].T
                           + f["markov_head.gate_proj.bias"])
            e = gate * emb
        else:
            x = torch.cat([s, emb, h[:, k]], -1) @ f["markov_head.joint_proj.weight"].T \
                + f["markov_head.joint_proj.bias"]
            g, c, o = x[:, :r], x[:, r:2 * r], x[:, 2 * r:]
            s = sigmoid(g) * s + (1 - sigmoid(g)) * torch.tanh(c)
            e = torch.tanh(o)
        z[:, k] = u[:, k] + e @ w2.T
        if config["enable_confidence_head"]:
            feat = torch.cat([h[:, k], emb], -1) if config["confidence_head_with_markov"] else h[:, k]
            logit = feat @ f["confidence_head.proj.weight"][0] + f["confidence_head.proj.bias"][0]
            if sts is not None:
                logit = logit / sts[k].double()
            conf[:, k] = sigmoid(logit)
        prev = tokens[:, k].long()
    t = temperature.double()
    greedy = t < 1e-5
    probs = torch.softmax(z / torch.where(greedy, 1.0, t)[:, None, None], dim=-1)
    onehot = torch.zeros_like(probs).scatter_(-1, tokens.long()[..., None], 1.0)
    probs = torch.where(greedy[:, None, None], onehot, probs)
    if not config["enable_confidence_head"]:
        return z, probs, None, None
    return z, probs, conf, torch.cumprod(conf, dim=1)


def inputs(num=3, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(num, GAMMA, V, generator=g) * scale).to(torch.bfloat16)
    anchor = torch.randint(0, V, (num,), generator=g)
    hidden = (torch.randn(num, GAMMA, D_HID, generator=g)).to(torch.bfloat16)
    temperature = torch.tensor([0.0, 1.0, 0.6][:num] + [1.0] * max(0, num - 3))
    return base, anchor, hidden, temperature


def check_against_law(out, state, config, base, anchor, hidden, temperature, sts=None):
    out = type(out)(*(to_cpu(t) for t in out))
    z, probs, conf, surv = law(state, config, base, anchor, out.tokens, hidden, temperature, sts)
    tokens = out.tokens.long()
    assert bool(((tokens >= 0) & (tokens < V)).all())
    picked = z.gather(-1, tokens[..., None]).squeeze(-1)
    greedy = temperature < 1e-5
    # Greedy rows take the argmax of z_k (up to fp32 rounding of a near tie).
    assert bool((picked[greedy] >= z[greedy].amax(-1) - 1e-4).all()), (tokens[greedy], z[greedy].argmax(-1))
    # Every row's p_d(x_k) and draft distribution are the law's; sampled tokens have positive probability.
    law_p = probs.gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.token_probs.double(), law_p, atol=2e-5, rtol=1e-4)
    assert bool((law_p > 0).all())
    torch.testing.assert_close(out.draft_probs.double(), probs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.draft_logits.double(), z, atol=2e-4, rtol=1e-5)
    if conf is None:
        assert out.confidence is None and out.survival is None
    else:
        torch.testing.assert_close(out.confidence.double(), conf, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.survival.double(), surv, atol=2e-5, rtol=1e-4)


def draft(head, base, anchor, hidden, temperature, backend, **kw):
    num = base.shape[0]
    return head.draft(to_device(base), to_device(anchor), to_device(temperature),
                      to_device(torch.arange(num, dtype=torch.int64) + 11), to_device(torch.tensor(3)),
                      hidden=to_device(hidden), backend=backend, exact=True, return_draft_probs=True,
                      return_draft_logits=True, **kw)


# --------------------------------------------------------------------------- loading and drafting


@pytest.mark.parametrize("conf", ["markov", "plain"])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_checkpoint_drives_markov_draft_per_the_equations_on_every_backend(tmp_path, head_type, conf):
    state, config = make_state(head_type, conf), make_config(head_type, conf)
    head = load_deepspec(write_checkpoint(tmp_path / "ckpt", state, config), device=DEVICE)
    assert isinstance(head, DraftHead)
    assert (head.head_type, head.gamma, head.rank, head.vocab_size, head.hidden_size) == \
        (head_type, GAMMA, R_RANK, V, D_HID)
    assert head.w1.dtype == torch.bfloat16 and head.confidence_with_markov == (conf == "markov")
    assert head.conf_weight.shape == ((D_HID + R_RANK,) if conf == "markov" else (D_HID,))
    assert head.sts_temperature is None
    base, anchor, hidden, temperature = inputs()
    tokens = {}
    for backend in BACKENDS:
        out = draft(head, base, anchor, hidden, temperature, backend)
        check_against_law(out, state, config, base, anchor, hidden, temperature)
        tokens[backend] = to_cpu(out.tokens)
    for backend, got in tokens.items():  # exact=True: token for token the reference
        assert torch.equal(got, tokens["reference"]), backend


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_sampled_row_follows_the_law(tmp_path, head_type):
    # One request's inputs repeated under many seeds: the first draft's frequencies are softmax(z_1 / T).
    state, config = make_state(head_type, "markov", seed=3), make_config(head_type, "markov")
    head = load_deepspec(state, config=config)
    num = 4000
    base, anchor, hidden, _ = inputs(1, seed=5, scale=1.0)
    base, hidden, anchor = base.expand(num, -1, -1), hidden.expand(num, -1, -1), anchor.expand(num)
    temperature = torch.full((num,), 1.3)
    out = head.draft(base, anchor, temperature, torch.arange(num, dtype=torch.int64), torch.tensor(0),
                     hidden=hidden, backend="reference")
    _, probs, _, _ = law(state, config, base[:1], anchor[:1], out.tokens[:1], hidden[:1], temperature[:1])
    freq = torch.bincount(out.tokens[:, 0].long(), minlength=V).double() / num
    p = probs[0, 0]
    tol = 4.5 * torch.sqrt(p * (1 - p) / num) + 1e-3
    assert bool(((freq - p).abs() <= tol).all()), (freq, p)


def test_without_confidence_head(tmp_path):
    state, config = make_state("vanilla", None), make_config("vanilla", None)
    head = load_deepspec(write_checkpoint(tmp_path / "c", state, config))
    assert head.conf_weight is None and head.conf_bias is None and not head.needs_hidden
    base, anchor, hidden, temperature = inputs()
    for backend in BACKENDS:
        out = draft(head, base, anchor, None, temperature, backend)
        check_against_law(out, state, config, base, anchor, None, temperature)


def test_softcap_applies_to_the_base_logits_before_the_markov_bias(tmp_path):
    state, config = make_state("gated", "markov"), make_config("gated", "markov", softcap=2.5)
    head = load_deepspec(write_checkpoint(tmp_path / "c", state, config))
    assert head.softcap == 2.5
    base, anchor, hidden, temperature = inputs(scale=6.0)
    for backend in BACKENDS:
        out = draft(head, base, anchor, hidden, temperature, backend)
        check_against_law(out, state, config, base, anchor, hidden, temperature)
        # A null softcap drafts from U itself: different logits here (|U| is well above the cap).
        plain = load_deepspec(state, config=make_config("gated", "markov", softcap=None))
        out_plain = draft(plain, base, anchor, hidden, temperature, backend)
        assert not torch.allclose(to_cpu(out_plain.draft_logits), to_cpu(out.draft_logits))
        capped = torch.tanh(base.float() / 2.5) * 2.5
        torch.testing.assert_close(
            to_cpu(out.draft_logits),
            to_cpu(draft(plain, capped, anchor, hidden, temperature, backend).draft_logits))


def test_sharded_checkpoint_with_and_without_index(tmp_path):
    state, config = make_state("rnn", "markov"), make_config("rnn", "markov")
    one = load_deepspec(write_checkpoint(tmp_path / "one", state, config))
    with_index = load_deepspec(write_checkpoint(tmp_path / "idx", state, config, shards=3))
    without = load_deepspec(write_checkpoint(tmp_path / "glob", state, config, shards=2, index=False))
    assert len([f for f in os.listdir(tmp_path / "idx") if f.endswith(".safetensors")]) == 3
    for head in (with_index, without):
        assert head.tensors().keys() == one.tensors().keys()
        for name, t in one.tensors().items():
            assert torch.equal(head.tensors()[name], t), name
    base, anchor, hidden, temperature = inputs()
    out = draft(with_index, base, anchor, hidden, temperature, "reference")
    check_against_law(out, state, config, base, anchor, hidden, temperature)


def test_state_dict_single_file_and_config_path(tmp_path):
    state, config = make_state("gated", "plain"), make_config("gated", "plain")
    directory = write_checkpoint(tmp_path / "c", state, config)
    heads = [
        load_deepspec(state, config=config),
        load_deepspec(state, config=os.path.join(directory, "config.json")),
        load_deepspec(os.path.join(directory, "model.safetensors")),  # config.json beside it
        load_deepspec(os.path.join(directory, "model.safetensors"), config=config),
    ]
    for head in heads:
        for name, t in heads[0].tensors().items():
            assert torch.equal(head.tensors()[name], t), name
    assert torch.equal(heads[0].w2, state["markov_head.markov_w2.weight"])  # no transpose
    assert heads[0].conf_bias.shape == () and heads[0].conf_weight.shape == (D_HID,)


def test_device_and_dtype(tmp_path):
    state, config = make_state("gated", "markov"), make_config("gated", "markov")
    head = load_deepspec(state, config=config, device=DEVICE, dtype=torch.float32)
    for name, t in head.tensors().items():
        assert t.dtype == torch.float32 and t.device.type == torch.device(DEVICE).type, name
    torch.testing.assert_close(head.w1, state["markov_head.markov_w1.weight"].float().to(DEVICE))
    with pytest.raises(CheckpointError, match="dtype"):
        load_deepspec(state, config=config, dtype=torch.float64)


def test_skipped_keys_are_logged_once_per_load(tmp_path, caplog):
    state, config = make_state("vanilla", "markov"), make_config("vanilla", "markov")
    directory = write_checkpoint(tmp_path / "c", state, config, shards=2)
    for source in (directory, state):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            load_deepspec(source, config=None if source is directory else config)
        records = [r for r in caplog.records if r.name == LOGGER]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert f"skipped {len(BACKBONE)} tensors" in records[0].getMessage()
        assert "lm_head" in records[0].getMessage() or "embed_tokens" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_deepspec(make_state("vanilla", "markov", backbone=False), config=config)
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("wrong", ["gate-candidate rows swapped", "[W1[x]; s; h] column order"])
def test_the_law_check_rejects_a_wrong_rnn_cell(wrong):
    # The check above can fail: the same drafts judged against a mis-wired joint_proj do not pass.
    state, config = make_state("rnn", "markov", seed=4), make_config("rnn", "markov")
    head = load_deepspec(state, config=config)
    base, anchor, hidden, temperature = inputs()
    out = draft(head, base, anchor, hidden, temperature, "reference")
    check_against_law(out, state, config, base, anchor, hidden, temperature)
    w = state["markov_head.joint_proj.weight"]
    r = R_RANK
    if wrong.startswith("gate"):
        bad = torch.cat([w[r:2 * r], w[:r], w[2 * r:]])
    else:
        bad = torch.cat([w[:, r:2 * r], w[:, :r], w[:, 2 * r:]], 1)
    with pytest.raises(AssertionError):
        check_against_law(out, dict(state, **{"markov_head.joint_proj.weight": bad}), config, base, anchor,
                          hidden, temperature)


def test_draft_needs_hidden_and_keeps_its_own_tensors():
    head = load_deepspec(make_state("rnn", None), config=make_config("rnn", None))
    base, anchor, hidden, temperature = inputs()
    with pytest.raises(ValueError, match="rnn head needs hidden"):
        head.draft(base, anchor, temperature, torch.arange(3), torch.tensor(0))
    with pytest.raises(TypeError, match="w1"):
        head.draft(base, anchor, temperature, torch.arange(3), torch.tensor(0), hidden=hidden, w1=head.w1)


# --------------------------------------------------------------------------- loader errors


def _error(tmp_path, state, config, **kw):
    directory = write_checkpoint(tmp_path / "bad", state, config)
    with pytest.raises(CheckpointError) as info:
        load_deepspec(directory, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("head_type, key, shape", [
    ("vanilla", "markov_head.markov_w1.weight", [V, R_RANK]),
    ("vanilla", "markov_head.markov_w2.weight", [V, R_RANK]),
    ("gated", "markov_head.gate_proj.weight", [R_RANK, D_HID + R_RANK]),
    ("gated", "markov_head.gate_proj.bias", [R_RANK]),
    ("rnn", "markov_head.joint_proj.weight", [3 * R_RANK, 2 * R_RANK + D_HID]),
    ("rnn", "markov_head.joint_proj.bias", [3 * R_RANK]),
    ("rnn", "confidence_head.proj.weight", [1, D_HID + R_RANK]),
    ("vanilla", "confidence_head.proj.bias", [1]),
])
def test_missing_key_names_the_key_and_its_shape(tmp_path, head_type, key, shape):
    state = make_state(head_type, "markov")
    del state[key]
    msg = _error(tmp_path, state, make_config(head_type, "markov"))
    assert f"missing key {key}" in msg and str(shape) in msg, msg


@pytest.mark.parametrize("key, bad, expected", [
    ("markov_head.joint_proj.weight", (2 * R_RANK + D_HID, 3 * R_RANK), [3 * R_RANK, 2 * R_RANK + D_HID]),
    ("markov_head.joint_proj.bias", (R_RANK,), [3 * R_RANK]),
    ("confidence_head.proj.weight", (D_HID + R_RANK,), [1, D_HID + R_RANK]),
])
def test_wrong_shape_names_the_key_and_the_expected_shape(tmp_path, key, bad, expected):
    state = make_state("rnn", "markov")
    state[key] = torch.zeros(bad, dtype=torch.bfloat16)
    msg = _error(tmp_path, state, make_config("rnn", "markov"))
    assert key in msg and f"expected {expected}" in msg and str(list(bad)) in msg, msg


def test_unknown_head_type(tmp_path):
    msg = _error(tmp_path, make_state("gated"), make_config("lstm"))
    assert "markov_head_type" in msg and "'lstm'" in msg and "vanilla, gated, rnn" in msg, msg


def test_vocab_size_disagreeing_with_config(tmp_path):
    msg = _error(tmp_path, make_state("gated"), make_config("gated", vocab_size=V + 3))
    assert "markov_head.markov_w1.weight" in msg and f"expected [{V + 3}, {R_RANK}]" in msg, msg
    assert f"vocab_size={V + 3}" in msg, msg


def test_rank_disagreeing_with_config(tmp_path):
    msg = _error(tmp_path, make_state("vanilla", None), make_config("vanilla", None, markov_rank=R_RANK + 1))
    assert "markov_head.markov_w1.weight" in msg and "markov_rank" in msg, msg


def test_confidence_width_disagreeing_with_confidence_head_with_markov(tmp_path):
    msg = _error(tmp_path, make_state("vanilla", "plain"), make_config("vanilla", "markov"))
    assert "confidence_head.proj.weight" in msg and f"expected [1, {D_HID + R_RANK}]" in msg, msg
    assert "confidence_head_with_markov=true" in msg, msg


def test_head_keys_the_config_does_not_expect(tmp_path):
    msg = _error(tmp_path, make_state("gated", None), make_config("vanilla", None))
    assert "markov_head.gate_proj" in msg and "'vanilla'" in msg, msg
    msg = _error(tmp_path, make_state("vanilla", "markov"), make_config("vanilla", None))
    assert "confidence_head.proj" in msg and "enable_confidence_head=false" in msg, msg


def test_config_errors(tmp_path):
    config = make_config("vanilla", None)
    del config["block_size"]
    assert "block_size" in _error(tmp_path, make_state("vanilla", None), config)
    msg = _error(tmp_path, make_state("vanilla", None), make_config("vanilla", None, markov_rank=0))
    assert "markov_rank=0" in msg
    msg = _error(tmp_path, make_state("vanilla", None), make_config("vanilla", None, final_logit_softcapping=-1))
    assert "final_logit_softcapping" in msg


def test_missing_files(tmp_path):
    state, config = make_state("vanilla", None), make_config("vanilla", None)
    directory = write_checkpoint(tmp_path / "c", state, config)
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        load_deepspec(directory)
    with pytest.raises(CheckpointError, match="needs config="):
        load_deepspec(os.path.join(directory, "model.safetensors"))
    with pytest.raises(CheckpointError, match="needs config="):
        load_deepspec(state)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        load_deepspec(empty, config=config)
    with pytest.raises(CheckpointError, match="no such file"):
        load_deepspec(tmp_path / "nowhere", config=config)
    sharded = write_checkpoint(tmp_path / "s", state, config, shards=2)
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_deepspec(sharded)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_deepspec(tmp_path / "junk.safetensors", config=config)


# --------------------------------------------------------------------------- stored STS temperatures


def _fitted(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4000, GAMMA, generator=g) * 2 + 1
    accept = torch.rand(4000, GAMMA, generator=g) < torch.sigmoid(logits / torch.tensor([0.6, 1.8, 1.2, 0.8]))
    lengths = torch.cumprod(accept.long(), 1).sum(1)
    return fit_sts(logits, lengths, observed_len=torch.full((4000,), GAMMA))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_saved_and_reloaded_sts_temperatures_give_identical_survival(tmp_path, head_type):
    state, config = make_state(head_type, "markov"), make_config(head_type, "markov")
    directory = write_checkpoint(tmp_path / "c", state, config)
    res = _fitted()
    written = save_sts(res, directory, metadata={"validation_set": "synthetic"})
    assert os.path.basename(written) == STS_FILENAME and os.path.dirname(written) == str(directory)
    head = load_deepspec(directory, device=DEVICE)
    assert torch.equal(to_cpu(head.sts_temperature), res.temperatures)
    assert head.sts_metadata["n_bins"] == 20 and head.sts_metadata["validation_set"] == "synthetic"
    assert head.sts_metadata["observed_count"] == [4000] * GAMMA
    base, anchor, hidden, temperature = inputs()
    for backend in BACKENDS:
        loaded = draft(head, base, anchor, hidden, temperature, backend)
        given = draft(load_deepspec(directory, device=DEVICE).with_sts_temperature(None), base, anchor, hidden,
                      temperature, backend, sts_temperature=to_device(res.temperatures))
        assert torch.equal(loaded.survival, given.survival), backend
        assert torch.equal(loaded.tokens, given.tokens), backend
        check_against_law(loaded, state, config, base, anchor, hidden, temperature, sts=res.temperatures)
    # The op's survival is survival_from_logits of the confidence logits at the stored temperatures.
    tokens = to_cpu(loaded.tokens).long()
    prev = torch.cat([anchor[:, None], tokens[:, :-1]], 1)
    w = state["confidence_head.proj.weight"].float()[0]
    conf_logits = torch.cat([hidden.float(), state["markov_head.markov_w1.weight"].float()[prev]], -1) @ w \
        + state["confidence_head.proj.bias"].float()[0]
    torch.testing.assert_close(to_cpu(loaded.survival), survival_from_logits(conf_logits, load_sts(written)[0]))


def test_sts_file_beside_a_single_file_checkpoint_and_bad_files(tmp_path):
    state, config = make_state("vanilla", "markov"), make_config("vanilla", "markov")
    directory = write_checkpoint(tmp_path / "c", state, config)
    save_sts(torch.tensor([1.0, 2.0, 0.5, 1.25]), directory)
    head = load_deepspec(os.path.join(directory, "model.safetensors"))
    assert head.sts_temperature.tolist() == [1.0, 2.0, 0.5, 1.25]
    assert head.sts_metadata["path"].endswith(STS_FILENAME)
    assert load_deepspec(state, config=config).sts_temperature is None  # a state dict has no "beside"
    save_sts(torch.ones(GAMMA + 1), directory)
    with pytest.raises(CheckpointError, match="5 STS temperatures, expected block_size=4"):
        load_deepspec(directory)
    with open(os.path.join(directory, STS_FILENAME), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=STS_FILENAME):
        load_deepspec(directory)


# --------------------------------------------------------------------------- the CLI


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                              else ""))
    return subprocess.run([sys.executable, "-m", "dspark_kernels", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


def test_cli_check_checkpoint_prints_the_head_and_drafts(tmp_path):
    state, config = make_state("rnn", "markov"), make_config("rnn", "markov")
    directory = write_checkpoint(tmp_path / "c", state, config, shards=2)
    res = _cli("check-checkpoint", str(directory))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "head type: rnn" in out
    assert f"gamma (block_size): {GAMMA}" in out and f"r (markov_rank): {R_RANK}" in out
    for name, shape in (("w1", [V, R_RANK]), ("w2", [V, R_RANK]), ("rnn_weight", [3 * R_RANK, 2 * R_RANK + D_HID]),
                        ("rnn_bias", [3 * R_RANK]), ("conf_weight", [D_HID + R_RANK])):
        line = next(l for l in out.splitlines() if l.split() and l.split()[0] == name)
        assert str(shape) in line and "bfloat16" in line, line
    assert "STS temperatures: not found" in out
    rows = [l for l in out.splitlines() if "tokens [" in l]
    assert len(rows) == 2 and "greedy" in rows[0]
    tokens = json.loads(rows[0].split("tokens ")[1].split("]")[0] + "]")
    assert len(tokens) == GAMMA and all(0 <= t < V for t in tokens)
    assert "skipped" in res.stderr  # the one log line about the backbone keys

    save_sts(_fitted(), directory)
    res = _cli("check-checkpoint", str(directory), "--requests", "3")
    assert res.returncode == 0, res.stderr
    assert "STS temperatures: found" in res.stdout
    assert len([l for l in res.stdout.splitlines() if "tokens [" in l]) == 3


def test_cli_check_checkpoint_single_file_with_config(tmp_path):
    state, config = make_state("vanilla", None), make_config("vanilla", None, softcap=30.0)
    directory = write_checkpoint(tmp_path / "c", state, config)
    os.rename(os.path.join(directory, "config.json"), tmp_path / "cfg.json")
    res = _cli("check-checkpoint", os.path.join(directory, "model.safetensors"), "--config", str(tmp_path / "cfg.json"))
    assert res.returncode == 0, res.stderr
    assert "head type: vanilla" in res.stdout and "final logit softcap: 30.0" in res.stdout
    assert "confidence head: none" in res.stdout


def test_cli_check_checkpoint_bad_checkpoint_exits_2(tmp_path):
    state = make_state("gated", "markov")
    del state["markov_head.gate_proj.weight"]
    directory = write_checkpoint(tmp_path / "c", state, make_config("gated", "markov"))
    res = _cli("check-checkpoint", str(directory))
    assert res.returncode == 2
    assert "missing key markov_head.gate_proj.weight" in res.stderr
    assert f"[{R_RANK}, {D_HID + R_RANK}]" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("check-checkpoint", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "no such file or directory" in res.stderr
    res = _cli("check-checkpoint", "--help")
    assert res.returncode == 0 and "STS" in res.stdout


# --------------------------------------------------------------------------- install


def test_safetensors_is_installed_by_the_readme_and_ci():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    readme_pip = next(l for l in readme.splitlines() if "pip install torch==" in l)
    ci_pip = next(l for l in ci.splitlines() if l.startswith("pip install torch=="))
    first = readme_pip.split("&& pip install ", 1)[1].split(" && ", 1)[0]
    assert ci_pip == "pip install " + first, (ci_pip, first)
    assert "safetensors" in first.split()
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    requires = setup.split("install_requires=", 1)[1].split("]", 1)[0]
    assert '"safetensors"' in requires and "torch" not in requires


def test_engine_exports():
    import dspark_kernels

    assert deepspec.ENGINE_EXPORTS == ("load_deepspec", "DraftHead")
    for name in deepspec.ENGINE_EXPORTS:
        assert getattr(dspark_kernels, name) is getattr(deepspec, name), name
        assert name in dspark_kernels.__all__, name
