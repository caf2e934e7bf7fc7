"""Load a DeepSpec DSpark draft checkpoint and draft from it with markov_draft.

DeepSpec (deepspec/modeling/dspark) saves the draft model with
save_pretrained: config.json and safetensors (one file, sharded above 50 GB
with model.safetensors.index.json), bf16, keys without a "model." prefix.
This package needs only the sequential Markov head and the confidence head:

    key                                   shape          markov_draft argument
    markov_head.markov_w1.weight          [V, r]         w1 (nn.Embedding)
    markov_head.markov_w2.weight          [V, r]         w2 (nn.Linear(r, V), no bias)
    markov_head.gate_proj.weight / .bias  [r, d+r] / [r] gate_weight / gate_bias (gated head)
    markov_head.joint_proj.weight / .bias [3r, 2r+d]/[3r] rnn_weight / rnn_bias (RNN head)
    confidence_head.proj.weight / .bias   [1, d+r] / [1] conf_weight [d+r] / conf_bias []
                                          ([1, d] without the Markov feature)

config.json: block_size (γ), markov_rank (r), markov_head_type ("vanilla",
"gated", "rnn"), enable_confidence_head, confidence_head_with_markov,
vocab_size (V), hidden_size (d), final_logit_softcapping (Gemma: U ←
cap·tanh(U / cap) before the Markov bias; null or absent: none). The
backbone, lm_head and embed_tokens are the engine's: the loader skips them
and says so in one log line per load. STS temperatures saved next to the
checkpoint (``sts_temperature.json``, see engine.calibration.save_sts) are
loaded with it.

Two calls: ``head = load_deepspec(path)``, then ``head.draft(U, anchor,
temperature, seed, offset, hidden=h)`` per round.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch

ENGINE_EXPORTS = ("load_deepspec", "DraftHead")

__all__ = ["CheckpointError", "DraftHead", "HEAD_TYPES", "load_deepspec"]

HEAD_TYPES = ("vanilla", "gated", "rnn")
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
HEAD_PREFIXES = ("markov_head.", "confidence_head.")

_W1, _W2 = "markov_head.markov_w1.weight", "markov_head.markov_w2.weight"
_GATE_W, _GATE_B = "markov_head.gate_proj.weight", "markov_head.gate_proj.bias"
_JOINT_W, _JOINT_B = "markov_head.joint_proj.weight", "markov_head.joint_proj.bias"
_CONF_W, _CONF_B = "confidence_head.proj.weight", "confidence_head.proj.bias"
# Keyword arguments of markov_draft that DraftHead.draft fills from the head itself.
_HEAD_ARGS = ("w1", "w2", "conf_weight", "conf_bias", "gate_weight", "gate_bias", "rnn_weight", "rnn_bias")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A DeepSpec checkpoint this package cannot run: the message names the key (or field) and what was expected."""


@dataclass(frozen=True)
class DraftHead:
    """The Markov and confidence heads of a DeepSpec DSpark draft, ready for markov_draft.

    head_type: "vanilla" | "gated" | "rnn"; gamma: block_size γ (drafts per
    round); rank: markov_rank r; vocab_size V; hidden_size d.
    w1, w2 [V, r]; gate_weight [r, d+r] / gate_bias [r] (gated head);
    rnn_weight [3r, 2r+d] / rnn_bias [3r] (RNN head: joint_proj, rows gate,
    candidate, output); conf_weight [d+r] (with the Markov feature, input
    [h_k; W1[x_{k-1}]]) or [d] (without, input h_k) and conf_bias [] when the
    confidence head is enabled, else None. softcap: the final-logit softcap
    (None: none). sts_temperature: [γ] fp32 STS temperatures or None;
    sts_metadata: what their file recorded (the fit's metadata). config: the
    config.json dict; source: where the head was loaded from.
    """

    head_type: str
    gamma: int
    rank: int
    vocab_size: int
    hidden_size: int
    w1: torch.Tensor
    w2: torch.Tensor
    gate_weight: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    rnn_weight: torch.Tensor | None = None
    rnn_bias: torch.Tensor | None = None
    conf_weight: torch.Tensor | None = None
    conf_bias: torch.Tensor | None = None
    confidence_with_markov: bool = True
    softcap: float | None = None
    sts_temperature: torch.Tensor | None = None
    sts_metadata: dict | None = None
    config: dict = dataclasses.field(default_factory=dict)
    source: str = "<state dict>"

    @property
    def has_confidence(self) -> bool:
        return self.conf_weight is not None

    @property
    def needs_hidden(self) -> bool:
        """Whether draft() needs hidden [R, γ, d] (gated and RNN heads, the confidence head)."""
        return self.head_type != "vanilla" or self.conf_weight is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors by markov_draft argument name (those that are set)."""
        names = (*_HEAD_ARGS, "sts_temperature")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def with_sts_temperature(self, temperatures: torch.Tensor | None, metadata: dict | None = None) -> "DraftHead":
        """A copy of the head with these STS temperatures ([γ] > 0, e.g. fit_sts(...).temperatures; None: none)."""
        if temperatures is None:
            return dataclasses.replace(self, sts_temperature=None, sts_metadata=None)
        temps = torch.as_tensor(temperatures).detach().to(device=self.w1.device, dtype=torch.float32)
        if temps.shape != (self.gamma,):
            raise ValueError(f"sts_temperature must have shape [{self.gamma}] (block_size), got {list(temps.shape)}")
        if not bool(torch.isfinite(temps).all()) or not bool((temps > 0).all()):
            raise ValueError("sts_temperature must be finite and > 0")
        return dataclasses.replace(self, sts_temperature=temps, sts_metadata=dict(metadata or {}))

    def draft(self, base_logits: torch.Tensor, anchor: torch.Tensor, temperature: torch.Tensor,
              seed: torch.Tensor, offset: torch.Tensor, *, hidden: torch.Tensor | None = None,
              **markov_draft_keywords):
        """One DSpark draft round: dspark_kernels.markov_draft with this head; returns its MarkovDraft.

        base_logits U [R, γ, V] (bf16/fp16/fp32), anchor [R], temperature [R],
        seed [R] int64, offset [] int64 as for markov_draft; hidden [R, γ, d]
        the backbone's last hidden states (needed by the gated and RNN heads
        and the confidence head). With a softcap c the head drafts from
        c·tanh(U / c) (computed in fp32) instead of U. The head's STS
        temperatures (when loaded) calibrate the confidence. Other keywords
        (return_draft_probs, return_draft_logits, exact, backend, or
        sts_temperature to override the head's) go to markov_draft.
        """
        from .. import markov_draft  # the public API, as every engine helper uses the ops

        clash = sorted(set(markov_draft_keywords) & set(_HEAD_ARGS))
        if clash:
            raise TypeError(f"DraftHead.draft takes the head's own {', '.join(clash)}; do not pass them")
        if hidden is None and self.needs_hidden:
            why = f"the {self.head_type} head" if self.head_type != "vanilla" else "the confidence head"
            raise ValueError(f"{why} needs hidden [R, γ, d={self.hidden_size}], the backbone's hidden states")
        if self.softcap is not None:
            cap = float(self.softcap)
            base_logits = torch.tanh(base_logits.float() / cap) * cap
        keywords = {k: v for k, v in self.tensors().items() if k not in ("w1", "w2")}
        keywords.update(markov_draft_keywords)
        return markov_draft(base_logits, anchor, self.w1, self.w2, temperature, seed, offset,
                            hidden=hidden, **keywords)

    def describe(self) -> list[str]:
        """Human-readable lines: head type, γ, r, V, d, softcap, each tensor's shape and dtype, STS."""
        lines = [f"head type: {self.head_type}",
                 f"gamma (block_size): {self.gamma}   r (markov_rank): {self.rank}   "
                 f"V (vocab_size): {self.vocab_size}   d (hidden_size): {self.hidden_size}",
                 f"confidence head: {_confidence_words(self)}",
                 f"final logit softcap: {self.softcap if self.softcap is not None else 'none'}"]
        for name, t in self.tensors().items():
            if name != "sts_temperature":
                lines.append(f"  {name:12s} {str(list(t.shape)):16s} {str(t.dtype).replace('torch.', '')}")
        if self.sts_temperature is None:
            lines.append("STS temperatures: not found")
        else:
            temps = ", ".join(f"{float(t):.4g}" for t in self.sts_temperature)
            lines.append(f"STS temperatures: found [{temps}]")
        return lines


def _confidence_words(head: DraftHead) -> str:
    if head.conf_weight is None:
        return "none"
    return "with the Markov feature [h; W1[x]]" if head.confidence_with_markov else "without the Markov feature [h]"


def load_deepspec(path_or_state_dict, *, config=None, device=None, dtype=None) -> DraftHead:
    """Load the Markov and confidence heads of a DeepSpec DSpark checkpoint as a :class:`DraftHead`.

    path_or_state_dict: a directory with config.json and *.safetensors (one
    file, or shards listed by model.safetensors.index.json, or several
    model-0000x-of-0000y.safetensors); a single .safetensors file (config=
    then, or a config.json beside it); or a state dict {key: tensor} (config=
    then). config: a dict or the path of a config.json, used instead of the
    directory's. device / dtype: where and in which float dtype (fp32, fp16,
    bf16) to keep the tensors (default: CPU and the checkpoint's dtype, bf16
    for DeepSpec). Only the head's keys are read; the other keys (backbone,
    lm_head, embed_tokens) are skipped with one log line. STS temperatures in
    ``sts_temperature.json`` beside the checkpoint are loaded when present.

    Raises CheckpointError (a ValueError) naming the key and the expected
    shape for a missing key, a wrong shape or an unexpected head key, and the
    field for an unknown markov_head_type or a config that disagrees with the
    tensors (e.g. vocab_size).
    """
    if dtype is not None and dtype not in _DTYPES:
        raise CheckpointError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
    sts_dir = None
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        tensors = dict(path_or_state_dict)
        bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"a state dict maps str keys to tensors; entry {bad[0]!r} does not")
        reader = _DictReader(tensors)
        if config is None:
            raise CheckpointError("a state dict needs config= (the checkpoint's config.json as a dict or a path)")
    else:
        path = os.fspath(path_or_state_dict)
        source = path
        if os.path.isdir(path):
            files = _safetensors_files(path)
            sts_dir = path
            if config is None:
                config = os.path.join(path, CONFIG_NAME)
        elif os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise CheckpointError(f"{path}: expected a directory or a .safetensors file")
            files = [path]
            sts_dir = os.path.dirname(os.path.abspath(path))
            if config is None:
                config = os.path.join(sts_dir, CONFIG_NAME)
                if not os.path.isfile(config):
                    raise CheckpointError(f"{path}: a single .safetensors file needs config= "
                                          f"(no {CONFIG_NAME} beside it)")
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        reader = _SafetensorsReader(files)
    cfg = _read_config(config)
    spec = _spec(cfg)

    keys = reader.keys()
    head_keys = [k for k in keys if k.startswith(HEAD_PREFIXES)]
    expected = {name: shape for name, shape, _ in spec["keys"]}
    unexpected = [k for k in head_keys if k not in expected]
    if unexpected:
        raise CheckpointError(_unexpected_message(unexpected[0], cfg, spec))
    loaded = {}
    for name, shape, required in spec["keys"]:
        if name not in keys:
            if required:
                raise CheckpointError(f"missing key {name}: expected shape {list(shape)} for "
                                      f"{spec['what'][name]} (from {source})")
            continue
        t = reader.get(name)
        loaded[name] = t
        if list(t.shape) != list(shape):
            raise CheckpointError(_shape_message(name, t, shape, spec, cfg))
        if not torch.is_floating_point(t):
            raise CheckpointError(f"{name} must be a floating tensor, got {t.dtype}")
    skipped = [k for k in keys if not k.startswith(HEAD_PREFIXES)]
    if skipped:
        logger.warning("load_deepspec(%s): skipped %d tensors that are not the Markov or confidence head "
                       "(backbone, lm_head, embed_tokens are the engine's), e.g. %s",
                       source, len(skipped), ", ".join(sorted(skipped)[:3]))

    def put(name, reshape=None):
        t = loaded.get(name)
        if t is None:
            return None
        if reshape is not None:
            t = t.reshape(reshape)
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype).contiguous()

    r, d = spec["r"], spec["d"]
    head = DraftHead(
        head_type=spec["head_type"], gamma=spec["gamma"], rank=r, vocab_size=spec["V"], hidden_size=d,
        w1=put(_W1), w2=put(_W2),
        gate_weight=put(_GATE_W), gate_bias=put(_GATE_B),
        rnn_weight=put(_JOINT_W), rnn_bias=put(_JOINT_B),
        conf_weight=put(_CONF_W, (-1,)), conf_bias=put(_CONF_B, ()),
        confidence_with_markov=spec["with_markov"], softcap=spec["softcap"], config=cfg, source=source,
    )
    if sts_dir is not None:
        from .calibration import STS_FILENAME, load_sts

        sts_path = os.path.join(sts_dir, STS_FILENAME)
        if os.path.isfile(sts_path):
            try:
                temps, meta = load_sts(sts_path)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from exc
            if not head.has_confidence:
                raise CheckpointError(f"{sts_path}: STS temperatures, but the checkpoint has no confidence head")
            if temps.shape[0] != head.gamma:
                raise CheckpointError(f"{sts_path}: {temps.shape[0]} STS temperatures, expected block_size="
                                      f"{head.gamma}")
            head = head.with_sts_temperature(temps, dict(meta, path=sts_path))
    return head


# --------------------------------------------------------------------------- config and expected keys


def _read_config(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path} (the checkpoint's config)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: the config must be a JSON object")
    return cfg


def _int_field(cfg: dict, name: str, minimum: int = 1) -> int:
    if name not in cfg:
        raise CheckpointError(f"config.json has no field {name!r}")
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"config.json field {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _spec(cfg: dict) -> dict:
    """Head type, sizes and the expected (key, shape, required) list from the config."""
    head_type = cfg.get("markov_head_type", "vanilla")
    if head_type not in HEAD_TYPES:
        raise CheckpointError(f"config.json field 'markov_head_type' is {head_type!r}: unknown head type "
                              f"(expected one of {', '.join(HEAD_TYPES)})")
    if cfg.get("markov_rank", None) == 0:
        raise CheckpointError("config.json has markov_rank=0 (no Markov head): markov_draft needs one")
    gamma = _int_field(cfg, "block_size")
    r = _int_field(cfg, "markov_rank")
    vocab = _int_field(cfg, "vocab_size")
    d = _int_field(cfg, "hidden_size")
    conf = bool(cfg.get("enable_confidence_head", False))
    with_markov = bool(cfg.get("confidence_head_with_markov", True))
    softcap = cfg.get("final_logit_softcapping", None)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
            raise CheckpointError(f"config.json field 'final_logit_softcapping' must be null or > 0, got {softcap!r}")
        softcap = float(softcap)
    keys = [(_W1, (vocab, r), True), (_W2, (vocab, r), True)]
    what = {_W1: "w1 (nn.Embedding(vocab_size, markov_rank))", _W2: "w2 (nn.Linear(markov_rank, vocab_size))"}
    if head_type == "gated":
        keys += [(_GATE_W, (r, d + r), True), (_GATE_B, (r,), True)]
        what.update({_GATE_W: "the gated head (Linear(hidden_size + markov_rank, markov_rank))",
                     _GATE_B: "the gated head's bias"})
    elif head_type == "rnn":
        keys += [(_JOINT_W, (3 * r, 2 * r + d), True), (_JOINT_B, (3 * r,), True)]
        what.update({_JOINT_W: "the RNN head (joint_proj = Linear(2·markov_rank + hidden_size, 3·markov_rank))",
                     _JOINT_B: "the RNN head's bias"})
    if conf:
        width = d + r if with_markov else d
        keys += [(_CONF_W, (1, width), True), (_CONF_B, (1,), True)]
        words = "hidden_size + markov_rank" if with_markov else "hidden_size (confidence_head_with_markov=false)"
        what.update({_CONF_W: f"the confidence head (Linear({words}, 1))", _CONF_B: "the confidence head's bias"})
    return dict(head_type=head_type, gamma=gamma, r=r, V=vocab, d=d, conf=conf, with_markov=with_markov,
                softcap=softcap, keys=keys, what=what)


def _unexpected_message(key: str, cfg: dict, spec: dict) -> str:
    if key.startswith("confidence_head.") and not spec["conf"]:
        if "enable_confidence_head" not in cfg:
            return f"unexpected key {key}: config.json has no enable_confidence_head (default false)"
        return (f"unexpected key {key}: config.json has enable_confidence_head="
                f"{json.dumps(cfg['enable_confidence_head'])}")
    if key in (_GATE_W, _GATE_B, _JOINT_W, _JOINT_B):
        return f"unexpected key {key} for markov_head_type={spec['head_type']!r} (does config.json match?)"
    return f"unexpected key {key}: not a key of a {spec['head_type']} DSpark head this package knows"


def _shape_message(name: str, t: torch.Tensor, shape, spec: dict, cfg: dict) -> str:
    msg = f"{name} has shape {list(t.shape)}, expected {list(shape)}"
    if name in (_W1, _W2) and t.dim() == 2:
        if t.shape[0] != spec["V"]:
            msg += f": its vocabulary {t.shape[0]} disagrees with config.json vocab_size={spec['V']}"
        elif t.shape[1] != spec["r"]:
            msg += f": its rank {t.shape[1]} disagrees with config.json markov_rank={spec['r']}"
    elif name == _CONF_W and t.dim() == 2:
        other = spec["d"] if spec["with_markov"] else spec["d"] + spec["r"]
        if t.shape[1] == other:
            msg += (f": config.json has confidence_head_with_markov="
                    f"{json.dumps(cfg.get('confidence_head_with_markov', True))}")
        else:
            msg += f" (hidden_size={spec['d']}, markov_rank={spec['r']})"
    else:
        msg += f" (hidden_size={spec['d']}, markov_rank={spec['r']})"
    return msg


# --------------------------------------------------------------------------- tensor sources


class _DictReader:
    def __init__(self, tensors: dict):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()


class _SafetensorsReader:
    """Reads single keys from one or more safetensors files without loading the rest."""

    def __init__(self, files: list[str]):
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - safetensors is an install requirement
            raise ImportError("loading safetensors checkpoints needs safetensors: pip install safetensors") from exc
        self._open = safe_open
        self._where: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    names = list(f.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
            for name in names:
                if name in self._where:
                    raise CheckpointError(f"key {name} is in two shards: {self._where[name]} and {path}")
                self._where[name] = path

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        with self._open(self._where[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {exc}") from exc
        files = []
        for name in dict.fromkeys(weight_map.values()):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} lists the shard {name}, which is missing")
            files.append(path)
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors file (and no {INDEX_NAME})")
    return files

