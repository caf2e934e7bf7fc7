"""Bad input, for every op: each error names the argument, with the documented type.

1. Generated from each op's argument table (``OP.args``, dspark_kernels/_op.py),
   for every op of the registry, starting from the op module's ``example()``
   (value checks on, every backend that runs here; the unmodified example
   passes on each of them). For each tensor argument the example gives: a
   Python list instead of the tensor (TypeError), one dimension more and one
   fewer (ValueError), a dtype outside its dtypes per dtype family (TypeError),
   for every dimension whose symbol an earlier argument (or an earlier
   dimension) already bound, and every literal or expression dimension, a size
   one larger (ValueError; the binding occurrence itself may legally change,
   so it is skipped), for a 0-d argument two elements or a second dimension
   (ValueError), and the argument on another device (ValueError). For value
   arguments with choices or bounds: a value outside them (ValueError) and
   one of the wrong type (TypeError). For an argument that ``requires``
   another: the other one None (ValueError naming the argument). A last test
   shows the generator cannot pass vacuously.
2. The op-specific tables: what a table cannot say (value checks, the op's
   own checks, exclusions, limits) and the cases the generator does not make.
   Where a case of these tables was the same change of the same argument as a
   generated one (same check, same error), it was dropped in favour of the
   generated case; a comment at its place in the table says which.
3. Device mismatches that need more than the generator's one-argument move.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import rng
from dspark_kernels.ops import OPS

from markov_model import SMALL_D, SMALL_RANK, SMALL_V, small_inputs, with_rnn_head
from paged_batch import make_batch, pack_rows
from rejection_model import random_batch
from support import DEVICE, available_backends, interpreted, to_device

MODULES = {name: importlib.import_module(f"dspark_kernels.ops.{name}") for name in OPS}
_IDENT = re.compile(r"[A-Za-z_]\w*")


def call(op: str, backend, kwargs: dict):
    """The public function of ``op`` on these keyword arguments, as they are."""
    return getattr(dk, op)(**kwargs, backend=backend)


def call_on_device(op: str, backend, kwargs: dict):
    """The public function of ``op`` with every tensor argument moved to DEVICE."""
    return call(op, backend, {k: to_device(v) for k, v in kwargs.items()})


# ---------------------------------------------------------------------------
# 1. Generated from the argument tables
# ---------------------------------------------------------------------------

# One wrong dtype per family: the first of each family the argument does not allow.
DTYPE_FAMILIES = (
    (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    (torch.int64, torch.int32, torch.int16),
    (torch.bool,),
)
# A value of the wrong type, per value kind.
WRONG_TYPE = {"int": "1", "float": "1.0", "str": 1}
# The other device: with CUDA the argument stays on the CPU while the rest goes to
# CUDA; without it the argument goes to the meta device (the op then dispatches to its
# fake, which runs the same argument checks).
OTHER_DEVICE = "cpu" if torch.device(DEVICE).type == "cuda" else "meta"


@dataclass(frozen=True)
class Case:
    """One generated bad input: change(example) -> kwargs that must raise exc matching match."""

    op: str
    arg: str
    kind: str
    change: Callable[[dict], dict]
    exc: type
    match: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.arg}-{self.kind}"


def _named(name: str) -> str:
    """The table's messages start with the argument's name."""
    return rf"^{re.escape(name)}\b"


def _replace(name: str, fn: Callable) -> Callable[[dict], dict]:
    return lambda d: {**d, name: fn(d[name])}


def _grown(i: int) -> Callable:
    """A tensor one larger along dimension i (values do not matter: the shape check fails first)."""
    def f(x):
        shape = list(x.shape)
        shape[i] += 1
        return x.new_zeros(shape)
    return f


def _without(names: set) -> Callable[[dict], dict]:
    return lambda d: {**d, **{n: None for n in names}}


def _wrong_dtypes(allowed: tuple) -> list:
    if not allowed:
        return []
    out = []
    for family in DTYPE_FAMILIES:
        wrong = [d for d in family if d not in allowed]
        if wrong:
            out.append(wrong[0])
    return out


def _tensor_cases(op: str, spec, bound: set) -> list[Case]:
    name = spec.name
    T = lambda kind, fn, exc, match=None: Case(op, name, kind, _replace(name, fn), exc, match or _named(name))  # noqa: E731
    cases = [
        T("list", lambda x: x.reshape(-1).tolist() if x.dim() == 0 else x.tolist(), TypeError),
        T("device", lambda x: x.to(OTHER_DEVICE), ValueError, rf"\b{re.escape(name)} is on {OTHER_DEVICE}\b"),
    ]
    cases += [T(f"dtype-{str(dt).replace('torch.', '')}", lambda x, dt=dt: x.to(dt), TypeError)
              for dt in _wrong_dtypes(spec.dtypes)]
    if spec.dims is None:  # 0-d or one-element
        cases.append(T("numel-2", lambda x: x.reshape(1).repeat(2), ValueError))
        cases.append(T("rank-2", lambda x: x.reshape(1, 1), ValueError))
        return cases
    cases.append(T("rank+1", lambda x: x[None], ValueError))
    if spec.dims:
        cases.append(T("rank-1", lambda x: x.new_zeros(x.shape[1:]), ValueError))
    for i, sym in enumerate(spec.dims):
        if _IDENT.fullmatch(sym):
            if sym not in bound:
                bound.add(sym)  # the binding occurrence: another size may be legal
                continue
        elif not sym.isdigit() and not set(_IDENT.findall(sym)) <= bound:
            continue  # an expression of symbols the example leaves unbound
        cases.append(T(f"dim{i}({sym})+1", _grown(i), ValueError))
    return cases


def _value_cases(op: str, spec) -> list[Case]:
    name = spec.name
    V = lambda kind, value, exc, match=None: Case(op, name, kind, lambda d: {**d, name: value}, exc,  # noqa: E731
                                                  match or _named(name))
    cases = []
    if spec.choices:
        outside = "__not_a_choice__" if spec.kind == "str" else max(spec.choices) + 1
        cases.append(V("not-a-choice", outside, ValueError))
    if spec.lo is not None:
        cases.append(V("below-lo", spec.lo - 1, ValueError))
    if spec.hi is not None:
        cases.append(V("above-hi", spec.hi + 1, ValueError))
    if cases and spec.kind in WRONG_TYPE:
        cases.append(V(f"type-{type(WRONG_TYPE[spec.kind]).__name__}", WRONG_TYPE[spec.kind], TypeError,
                       rf"\b{re.escape(name)}\b"))
    return cases


def _requires_cases(op: str, args: tuple, example: dict) -> list[Case]:
    """The required argument None; earlier arguments that need it (or need what goes with it)
    are dropped too, so the first argument the checks reach with a missing requirement is this one."""
    cases = []
    present = lambda n: example.get(n) is not None  # noqa: E731
    order = [a.name for a in args]
    specs = {a.name: a for a in args}
    for spec in args:
        if not present(spec.name):
            continue
        for other, _ in spec.requires:
            if not present(other) or not specs[other].optional:
                continue
            removed = {other}
            grew = True
            while grew:
                grew = False
                for s in args[: order.index(spec.name)]:
                    if s.name not in removed and present(s.name) and any(o in removed for o, _ in s.requires):
                        removed.add(s.name)
                        grew = True
            if all(specs[n].optional for n in removed):
                cases.append(Case(op, spec.name, f"requires-{other}", _without(removed), ValueError,
                                  rf"^{re.escape(spec.name)} needs {re.escape(other)}\b"))
    return cases


def generated_cases(op: str) -> list[Case]:
    """Every generated bad input of ``op``, from its table and example() (see the module docstring)."""
    module = MODULES[op]
    example = module.example()
    cases, bound = [], set()
    for spec in module.OP.args:
        if example.get(spec.name) is None:
            continue  # absent: checked by nothing, binds nothing
        if spec.kind == "Tensor":
            cases += _tensor_cases(op, spec, bound)
        else:
            cases += _value_cases(op, spec)
    return cases + _requires_cases(op, module.OP.args, example)


GENERATED = {op: generated_cases(op) for op in OPS}
BACKENDS = {op: available_backends(MODULES[op]) for op in OPS}


@pytest.mark.parametrize("op,backend", [(op, b) for op in OPS for b in BACKENDS[op]])
def test_example_passes(op, backend, value_checks_on):
    """The base of the generated cases is valid input on every backend."""
    call(op, backend, MODULES[op].example(device=DEVICE))


@pytest.mark.parametrize("case,backend", [pytest.param(c, b, id=f"{c.id}-{b}")
                                          for op in OPS for c in GENERATED[op] for b in BACKENDS[op]])
def test_generated_bad_input_names_the_argument(case, backend, value_checks_on):
    bad = case.change(MODULES[case.op].example(device=DEVICE))
    with pytest.raises(case.exc, match=case.match):
        call(case.op, backend, bad)


def _differs(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device)
    return type(a) is not type(b) or a != b


@pytest.mark.parametrize("op", OPS)
def test_generator_is_not_vacuous(op):
    """At least one case per tensor argument of the table; every tensor the example gives
    gets the list, device, dtype and rank cases; every dimension an earlier argument binds
    (and no other) gets its size case; every requirement the example holds gets its case;
    and every case really changes its argument and nothing else (for a requirement: only
    removes the required argument and the ones that need it)."""
    module = MODULES[op]
    cases = GENERATED[op]
    example = module.example()
    assert len(cases) >= len(module.OP.tensors), (op, len(cases))
    kinds = defaultdict(set)
    for c in cases:
        kinds[c.arg].add(c.kind)
    bound, shape_cases = set(), 0
    for spec in module.OP.args:
        if example.get(spec.name) is None:
            continue
        if spec.kind != "Tensor":
            if spec.choices or spec.lo is not None or spec.hi is not None:
                assert any(k.startswith("type-") for k in kinds[spec.name]), (op, spec.name)
            continue
        got = kinds[spec.name]
        assert {"list", "device"} <= got, (op, spec.name, got)
        assert any(k.startswith("dtype-") for k in got) or not spec.dtypes, (op, spec.name, got)
        assert ({"numel-2", "rank-2"} if spec.dims is None else {"rank+1"}) <= got, (op, spec.name, got)
        for i, sym in enumerate(spec.dims or ()):
            symbols = set(_IDENT.findall(sym))
            if (sym in bound) if _IDENT.fullmatch(sym) else symbols <= bound:
                assert f"dim{i}({sym})+1" in got, (op, spec.name, i, got)
                shape_cases += 1
            bound |= symbols
        for other, _ in spec.requires:
            if example.get(other) is not None:
                assert f"requires-{other}" in got, (op, spec.name, other, got)
    for c in cases:
        bad = c.change(dict(example))
        changed = {k for k in set(bad) | set(example) if _differs(bad.get(k), example.get(k))}
        if c.kind.startswith("requires-"):
            assert c.kind[len("requires-"):] in changed and c.arg not in changed, (c.id, changed)
            assert all(bad[k] is None for k in changed), (c.id, changed)
        else:
            assert changed == {c.arg}, (c.id, changed)
    assert sum(c.kind.startswith("dim") for c in cases) == shape_cases, op


# ---------------------------------------------------------------------------
# 2. Op-specific tables
# ---------------------------------------------------------------------------


def _set(name, value):
    return lambda d: {**d, name: value(d[name]) if callable(value) else value}


# --- markov_draft -----------------------------------------------------------


def _at(i, v):
    """Replace element i of a 1-d tensor (or of the flattened tensor) by v."""

    def f(t):
        t = t.clone()
        t.view(-1)[i] = v
        return t

    return f


def _too_long(d):
    return dict(base_logits=torch.zeros(0, rng.MAX_POSITION, SMALL_V), anchor=torch.zeros(0, dtype=torch.int64),
                w1=d["w1"], w2=d["w2"], temperature=torch.zeros(0), seed=torch.zeros(0, dtype=torch.int64),
                offset=d["offset"])


# Dropped as the same change as a generated markov_draft case (see the module docstring),
# by their former names: base_logits_rank (rank-1), base_logits_dtype_int (dtype-int64),
# base_logits_dtype_f64 (dtype-float64), anchor_rank (rank+1), anchor_dtype_float
# (dtype-float32), anchor_dtype_int16 (dtype-int16), w1_rank (rank-1), w1_dtype
# (dtype-float64), w1_vocab_mismatch (dim0(V)+1), w2_rank (rank+1), w2_dtype (dtype-int64),
# w2_rank_mismatch (dim1(r)+1), temperature_rank (rank+1), temperature_dtype (dtype-int64),
# seed_rank (rank+1), seed_dtype_int32 (dtype-int32), offset_shape (numel-2), offset_rank
# (rank-2), offset_dtype (dtype-int32), hidden_rank (rank-1), hidden_dtype (dtype-float64),
# conf_weight_rank (rank+1), conf_weight_dtype (dtype-float64), conf_weight_without_hidden
# (requires-hidden), conf_bias_shape (numel-2), conf_bias_rank (rank-2), conf_bias_dtype
# (dtype-int64), conf_bias_without_conf_weight (requires-conf_weight), sts_temperature_shape
# (dim0(G)+1), sts_temperature_rank (rank+1), sts_temperature_dtype (dtype-int64),
# sts_temperature_without_conf_weight (requires-conf_weight), gate_weight_rank (rank-1),
# gate_weight_dtype (dtype-float64), gate_weight_without_hidden (requires-hidden),
# gate_bias_dtype (dtype-float64), gate_bias_without_gate_weight (requires-gate_weight).
MARKOV_BAD = [
    # base_logits
    ("base_logits_no_vocab", _set("base_logits", lambda t: t[..., :0]), ValueError, "base_logits"),
    ("base_logits_gamma_too_long", _too_long, ValueError, "base_logits"),
    ("base_logits_nan", _set("base_logits", _at(7, math.nan)), ValueError, "base_logits"),
    ("base_logits_pos_inf", _set("base_logits", _at(7, math.inf)), ValueError, "base_logits"),
    ("base_logits_row_all_neg_inf", _set("base_logits", lambda t: t.index_fill(1, torch.tensor([1]), -math.inf)),
     ValueError, "base_logits"),
    ("w1_nan", _set("w1", _at(3, math.nan)), ValueError, "w1"),
    ("w2_nan", _set("w2", _at(5, math.nan)), ValueError, "w2"),
    ("w2_inf", _set("w2", _at(5, math.inf)), ValueError, "w2"),
    ("hidden_nan", _set("hidden", _at(2, math.nan)), ValueError, "hidden"),
    ("conf_weight_nan", _set("conf_weight", _at(1, math.nan)), ValueError, "conf_weight"),
    ("gate_weight_nan", _set("gate_weight", _at(4, math.nan)), ValueError, "gate_weight"),
    # anchor
    ("anchor_shape", _set("anchor", lambda t: t[:-1]), ValueError, "anchor"),
    ("anchor_negative", _set("anchor", _at(1, -1)), ValueError, "anchor"),
    ("anchor_equal_to_vocab", _set("anchor", _at(1, SMALL_V)), ValueError, "anchor"),
    # weights
    ("w2_vocab_mismatch", _set("w2", lambda t: t[:-1]), ValueError, "w2"),
    ("w2_transposed_layout", _set("w2", lambda t: t.t().contiguous()), ValueError, "w2"),
    # temperature
    ("temperature_shape", _set("temperature", lambda t: t[:-1]), ValueError, "temperature"),
    ("temperature_nan", _set("temperature", _at(0, math.nan)), ValueError, "temperature"),
    ("temperature_inf", _set("temperature", _at(0, math.inf)), ValueError, "temperature"),
    ("temperature_neg_inf", _set("temperature", _at(0, -math.inf)), ValueError, "temperature"),
    ("temperature_negative", _set("temperature", _at(2, -0.5)), ValueError, "temperature"),
    # seed, offset
    ("seed_shape", _set("seed", lambda t: torch.cat([t, t])), ValueError, "seed"),
    ("seed_dtype_float", _set("seed", lambda t: t.double()), TypeError, "seed"),
    # hidden
    ("hidden_shape", _set("hidden", lambda t: t[:, :1]), ValueError, "hidden"),
    # confidence head
    ("conf_weight_shape", _set("conf_weight", lambda t: t[:-1]), ValueError, "conf_weight"),
    ("sts_temperature_zero", _set("sts_temperature", _at(1, 0.0)), ValueError, "sts_temperature"),
    ("sts_temperature_negative", _set("sts_temperature", _at(0, -1.0)), ValueError, "sts_temperature"),
    ("sts_temperature_nan", _set("sts_temperature", _at(0, math.nan)), ValueError, "sts_temperature"),
    ("sts_temperature_inf", _set("sts_temperature", _at(0, math.inf)), ValueError, "sts_temperature"),
    # gated head
    ("gate_weight_shape", _set("gate_weight", lambda t: t[:, :SMALL_D]), ValueError, "gate_weight"),
    ("gate_bias_shape", _set("gate_bias", lambda t: t[:-1]), ValueError, "gate_bias"),
    ("gate_and_rnn_weight", lambda d: dict(with_rnn_head(d), gate_weight=d["gate_weight"]), ValueError,
     "gate_weight.*rnn_weight"),
    # RNN head (not in example(): the generator makes no case for it)
    ("rnn_weight_shape", lambda d: dict(with_rnn_head(d), rnn_weight=torch.zeros(SMALL_RANK, SMALL_RANK)), ValueError,
     "rnn_weight"),
    ("rnn_weight_rank", lambda d: dict(with_rnn_head(d), rnn_weight=torch.zeros(2 * SMALL_RANK)), ValueError,
     "rnn_weight"),
    ("rnn_weight_dtype",
     lambda d: dict(with_rnn_head(d), rnn_weight=torch.zeros(3 * SMALL_RANK, 2 * SMALL_RANK + SMALL_D,
                                                              dtype=torch.float64)),
     TypeError, "rnn_weight"),
    ("rnn_bias_shape", lambda d: dict(with_rnn_head(d), rnn_bias=torch.zeros(2 * SMALL_RANK)), ValueError, "rnn_bias"),
    ("rnn_bias_dtype", lambda d: dict(with_rnn_head(d), rnn_bias=torch.zeros(SMALL_RANK, dtype=torch.int32)),
     TypeError, "rnn_bias"),
    ("rnn_bias_without_rnn_weight", lambda d: dict(with_rnn_head(d), rnn_weight=None), ValueError, "rnn_bias"),
]


def test_markov_draft_allowed_edge_values(value_checks_on):
    """-inf logits (masked tokens), temperature 0 and sts/conf_bias as one-element tensors are valid;
    a masked token is never drawn and has draft probability 0."""
    d = small_inputs()
    d["base_logits"][:, :, 1] = -math.inf
    d["conf_bias"] = torch.tensor([0.2])
    out = call_on_device("markov_draft", "reference", dict(d, return_draft_probs=True))
    assert not bool((out.tokens == 1).any())
    assert bool((out.draft_probs[..., 1] == 0).all())


# --- rejection_sample ---------------------------------------------------------

def _rejection_good():
    args, kw = random_batch(R=6, V=7, gamma=3, seed=9)
    names = ["target_logits", "draft_tokens", "draft_probs", "lengths", "cu_verify", "temperature", "seed"]
    d = dict(zip(names, args))
    d["offset"] = torch.tensor(0, dtype=torch.int64)
    d.update(kw)
    return d


def _logits_mode(d):
    q = d.pop("draft_probs")
    d["draft_probs"] = None
    d["draft_logits"] = torch.log(q)
    d["draft_token_probs"] = q.gather(-1, d["draft_tokens"].long()[..., None]).squeeze(-1)
    return d


def _consistent_logits_mode(d):
    """Byte-minimal inputs as markov_draft gives them: token probs = softmax(draft_logits / T_d) at the drafts."""
    d = _logits_mode(d)
    d["draft_temperature"] = torch.ones_like(d["temperature"])
    return d


def _halve_token_probs(d):
    return {**d, "draft_token_probs": d["draft_token_probs"] * 0.5}


def test_consistent_byte_minimal_inputs_pass(value_checks_on):
    d = _consistent_logits_mode(_rejection_good())
    for backend in BACKENDS["rejection_sample"]:
        call_on_device("rejection_sample", backend, d)


def _lengths_plus(delta_at):
    def f(d):
        lengths = d["lengths"].clone()
        i, v = delta_at
        lengths[i] = v
        d = {**d, "lengths": lengths}
        return d

    return f


# Dropped as the same change as a generated rejection_sample case (see the module
# docstring), by their former names: target_logits_rank (rank+1), draft_tokens_rank
# (rank-1), lengths_rank (rank+1), draft_probs_rank (rank-1), seed_rank (rank+1),
# offset_shape (numel-2), draft_probs_vocab (dim2(V)+1), target_logits_dtype (dtype-int64),
# draft_tokens_dtype (dtype-float32), lengths_dtype (dtype-float32), cu_verify_dtype
# (dtype-float32), temperature_dtype (dtype-int64), seed_dtype (dtype-int32), offset_dtype
# (dtype-int32), draft_probs_dtype (dtype-float64), top_k_dtype (dtype-float32),
# temperature_not_tensor (list).
REJECTION_BAD = [
    # shape
    ("lengths_shape", _set("lengths", lambda t: t[:-1]), ValueError, "lengths"),
    ("cu_verify_shape", _set("cu_verify", lambda t: t[:-1]), ValueError, "cu_verify"),
    ("temperature_shape", _set("temperature", lambda t: t[:-1]), ValueError, "temperature"),
    ("seed_shape", _set("seed", lambda t: t[:-1]), ValueError, "seed"),
    ("top_k_shape", _set("top_k", lambda t: t[:-1]), ValueError, "top_k"),
    ("top_p_shape", _set("top_p", lambda t: t[:-1]), ValueError, "top_p"),
    ("draft_probs_gamma", _set("draft_probs", lambda t: t[:, :-1]), ValueError, "draft_probs"),
    ("draft_logits_vocab", lambda d: {**_logits_mode(d), "draft_logits": torch.zeros(6, 3, 8)}, ValueError,
     "draft_logits"),
    ("draft_token_probs_shape", lambda d: {**_logits_mode(d), "draft_token_probs": torch.full((6, 2), 0.5)},
     ValueError, "draft_token_probs"),
    ("draft_token_probs_alone", lambda d: {**_logits_mode(d), "draft_logits": None}, ValueError,
     "draft_token_probs"),
    # values
    ("lengths_negative", _lengths_plus((1, -1)), ValueError, "lengths"),
    ("lengths_above_gamma", _lengths_plus((1, 4)), ValueError, "lengths"),
    ("cu_verify_inconsistent", _set("cu_verify", lambda t: t + torch.arange(7, dtype=t.dtype)), ValueError,
     "cu_verify"),
    ("cu_verify_not_from_zero", _set("cu_verify", lambda t: t + 1), ValueError, "cu_verify"),
    ("cu_verify_past_rows", _set("target_logits", lambda t: t[:-1]), ValueError, "target_logits|cu_verify"),
    ("draft_token_id_too_large", _set("draft_tokens", lambda t: torch.where(torch.arange(3) == 0, 7, t)),
     ValueError, "draft_tokens"),
    ("draft_token_id_negative", _set("draft_tokens", lambda t: torch.where(torch.arange(3) == 0, -1, t)),
     ValueError, "draft_tokens"),
    ("temperature_inf", _set("temperature", lambda t: torch.where(torch.arange(6) == 2, math.inf, t)), ValueError,
     "temperature"),
    ("temperature_nan", _set("temperature", lambda t: torch.where(torch.arange(6) == 2, math.nan, t)), ValueError,
     "temperature"),
    ("temperature_negative", _set("temperature", lambda t: torch.where(torch.arange(6) == 2, -0.5, t)), ValueError,
     "temperature"),
    ("top_p_zero", _set("top_p", lambda t: torch.where(torch.arange(6) == 1, 0.0, t)), ValueError, "top_p"),
    ("top_p_above_one", _set("top_p", lambda t: torch.where(torch.arange(6) == 1, 1.5, t)), ValueError, "top_p"),
    ("top_p_negative", _set("top_p", lambda t: torch.where(torch.arange(6) == 1, -0.2, t)), ValueError, "top_p"),
    ("top_p_nan", _set("top_p", lambda t: torch.where(torch.arange(6) == 1, math.nan, t)), ValueError, "top_p"),
    ("target_logits_nan", _set("target_logits", lambda t: torch.where(torch.arange(7) == 3, math.nan, t)),
     ValueError, "target_logits"),
    ("draft_probs_nan", _set("draft_probs", lambda t: torch.where(torch.arange(7) == 3, math.nan, t)), ValueError,
     "draft_probs"),
    ("draft_probs_negative", _set("draft_probs", lambda t: torch.where(torch.arange(7) == 3, -0.1, t)), ValueError,
     "draft_probs"),
    # The residual needs the exact draft distribution: unnormalised rows and token probabilities that
    # disagree with the logits are caller errors (issue 12); the unchecked result is documented in the op.
    ("draft_probs_unnormalised", _set("draft_probs", lambda t: t * 1.5), ValueError, "draft_probs.*sum to 1"),
    ("draft_token_probs_inconsistent", lambda d: _halve_token_probs(_consistent_logits_mode(d)), ValueError,
     "draft_token_probs disagree"),
]


# op -> (its base inputs (CPU), the valid inputs derived from them, its table); every backend.
TABLES = {
    "markov_draft": (small_inputs, lambda d: [d, with_rnn_head(d)], MARKOV_BAD),
    "rejection_sample": (_rejection_good, lambda d: [d], REJECTION_BAD),
}


@pytest.mark.parametrize("op,backend,mutate,exc,match", [
    pytest.param(op, b, *row[1:], id=f"{op}-{row[0]}-{b}") for op, (_, _, table) in TABLES.items() for row in table
    for b in BACKENDS[op]])
def test_table_bad_input_names_the_argument(op, backend, mutate, exc, match, value_checks_on):
    base, valid, _ = TABLES[op]
    d = base()
    if not interpreted(backend):
        for good in valid(d):
            call_on_device(op, backend, good)  # the unmodified inputs are fine
    with pytest.raises(exc, match=match):
        call_on_device(op, backend, mutate(dict(d)))


# --- verify_attention ---------------------------------------------------------


def _va_good():
    args, _ = make_batch([2, 3], [4, 1], tree=True)
    return {k: v.cpu() for k, v in args.items()}


def _va_bad(**changes):
    a = _va_good()
    for k, v in changes.items():
        a[k] = v(a) if callable(v) else v
    return a


# Dropped as the same change as a generated verify_attention case (see the module
# docstring): "page_table is on meta" and "tree_mask is on meta" (device, whose match
# is "<name> is on meta" there too).
VERIFY_ATTENTION_BAD = [
    (ValueError, "q must have 3 dimensions", dict(q=lambda a: a["q"][0])),
    (TypeError, "q must have dtype", dict(q=lambda a: a["q"].double())),
    (ValueError, "k_cache must have 4 dimensions", dict(k_cache=lambda a: a["k_cache"][0])),
    (TypeError, "k_cache has dtype float16", dict(k_cache=lambda a: a["k_cache"].half())),
    (TypeError, "v_cache has dtype bfloat16", dict(v_cache=lambda a: a["v_cache"].bfloat16())),
    (ValueError, r"k_cache must have shape \(P, S, Hkv, D\) = \(\d+, \d+, \d+, 16\)", dict(k_cache=lambda a: a["k_cache"][..., :15])),
    (ValueError, "v_cache must have shape", dict(v_cache=lambda a: a["v_cache"][:, :2])),
    (ValueError, "q has 5 heads, not a positive multiple", dict(q=lambda a: a["q"][:, :5])),
    (ValueError, "q has 0 heads, not a positive multiple", dict(q=lambda a: a["q"][:, :0])),
    (ValueError, "v_cache must have 4 dimensions", dict(v_cache=lambda a: a["v_cache"][0])),
    (ValueError, "k_cache dims must be positive", dict(k_cache=lambda a: a["k_cache"][:, :0],
                                                       v_cache=lambda a: a["v_cache"][:, :0])),
    (TypeError, "kv_lens must have dtype", dict(kv_lens=lambda a: a["kv_lens"].float())),
    (TypeError, "cu_verify must have dtype", dict(cu_verify=lambda a: a["cu_verify"].float())),
    (ValueError, "tree_mask must have 2 dimensions", dict(tree_mask=lambda a: a["tree_mask"][0])),
    (TypeError, "page_table must have dtype", dict(page_table=lambda a: a["page_table"].float())),
    (ValueError, "page_table must have 2 dimensions", dict(page_table=lambda a: a["page_table"][0])),
    (ValueError, "kv_lens must have shape", dict(kv_lens=lambda a: a["kv_lens"][:1])),
    (ValueError, "cu_verify must have shape", dict(cu_verify=lambda a: a["cu_verify"][:2])),
    (TypeError, "tree_mask must have dtype", dict(tree_mask=lambda a: a["tree_mask"].long())),
    (ValueError, "tree_mask must have shape", dict(tree_mask=lambda a: torch.zeros(7, 3, dtype=torch.int32))),
    (ValueError, "tree_mask must have shape", dict(tree_mask=lambda a: a["tree_mask"][:3])),
    # value checks
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([1, 2, 5], dtype=torch.int32))),
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([0, 3, 2], dtype=torch.int32))),
    (ValueError, "cu_verify must start at 0", dict(cu_verify=torch.tensor([0, 3, 8], dtype=torch.int32))),
    (ValueError, "kv_lens must include the verify tokens", dict(kv_lens=torch.tensor([6, 2], dtype=torch.int32))),
    (ValueError, "kv_lens must be >= 0", dict(kv_lens=torch.tensor([6, -1], dtype=torch.int32),
                                              cu_verify=torch.tensor([0, 2, 2], dtype=torch.int32))),
    (ValueError, "page_table has 3 pages per request", dict(kv_lens=torch.tensor([6, 10], dtype=torch.int32))),
    (ValueError, "page_table holds page ids outside", dict(page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([0]), 99))),
    (ValueError, "page_table holds page ids outside", dict(page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([0]), -1))),
    (ValueError, "tree_mask row t must set bit t", dict(tree_mask=lambda a: a["tree_mask"] & ~torch.tensor([[2, 0]], dtype=torch.int32))),
    (ValueError, "tree_mask row t may set only bits j <= t", dict(tree_mask=lambda a: a["tree_mask"] | torch.tensor([[4, 0]], dtype=torch.int32))),
    (ValueError, "tree_mask row t may set only bits j <= t", dict(tree_mask=lambda a: a["tree_mask"] | torch.tensor([[0, 1]], dtype=torch.int32))),
]


@pytest.mark.parametrize("exc,match,changes", VERIFY_ATTENTION_BAD, ids=[m for _, m, _ in VERIFY_ATTENTION_BAD])
def test_verify_attention_bad_arguments_named(exc, match, changes):
    with pytest.raises(exc, match=match):
        dk.verify_attention(**_va_bad(**changes), backend="reference")


def test_verify_attention_bad_scalars_named():
    for kw, match in ((dict(window=0), "window"), (dict(window=-2), "window"), (dict(softcap=-1.0), "softcap"),
                      (dict(softcap=float("inf")), "softcap"), (dict(sm_scale=0.0), "sm_scale"),
                      (dict(sm_scale=float("nan")), "sm_scale")):
        with pytest.raises(ValueError, match=match):
            dk.verify_attention(**_va_good(), **kw)


def test_verify_attention_tree_limit_64_tokens():
    args, _ = make_batch([65], [0], hkv=1, group=1, pad_rows=0)
    args = {k: v.cpu() if v is not None else v for k, v in args.items()}
    rows = [set(range(min(t + 1, 64))) for t in range(65)]  # bit 64 does not fit: checked first
    with pytest.raises(ValueError, match="tree_mask holds 64 tokens per row but a request verifies 65"):
        dk.verify_attention(**dict(args, tree_mask=pack_rows(rows, 2)))
    with pytest.raises(ValueError, match="tree_mask holds 32 tokens"):
        dk.verify_attention(**dict(args, tree_mask=pack_rows([{0}] * 65, 1)))
    # without a tree, long blocks are fine
    assert dk.verify_attention(**args).shape == args["q"].shape


# --- schedule_verify ----------------------------------------------------------

SV_SURVIVAL = torch.tensor([[0.9, 0.5], [0.7, 0.7]])
SV_SPS = torch.ones(16)


def _schedule(**kw):
    return dk.schedule_verify(kw.pop("survival", SV_SURVIVAL), kw.pop("sps", SV_SPS), **kw)


# Dropped as the same change as a generated schedule_verify case (see the module
# docstring): survival [2] (rank-1), sps [3, 7] (rank+1), sps int64 (dtype-int64),
# mode "greedy" (not-a-choice), history [3, 2] (dim0(R)+1), history int64 (dtype-int64),
# max_len float32 (dtype-float32), max_len [3] (dim0(R)+1).
SCHEDULE_BAD = [
    ("survival_increasing", dict(survival=torch.tensor([[0.5, 0.8], [0.7, 0.7]])), ValueError, "survival"),
    ("survival_above_one", dict(survival=torch.tensor([[1.5, 0.5], [0.7, 0.7]])), ValueError, "survival"),
    ("survival_nan", dict(survival=torch.tensor([[float("nan"), 0.5], [0.7, 0.7]])), ValueError, "survival"),
    ("survival_int32", dict(survival=torch.ones(2, 2, dtype=torch.int32)), TypeError, "survival"),
    ("sps_too_short", dict(sps=torch.ones(6)), ValueError, "sps"),  # needs R·(γ+1) + 1 = 7 entries
    ("sps_negative", dict(sps=-torch.ones(7)), ValueError, "sps"),
    ("async_without_history", dict(mode="async"), ValueError, "history"),
    ("history_increasing", dict(mode="async", history=torch.tensor([[0.1, 0.5], [0.7, 0.7]])), ValueError,
     "history"),
    ("active_int32", dict(active=torch.ones(2, dtype=torch.int32)), TypeError, "active"),
    ("active_shape", dict(active=torch.ones(1, dtype=torch.bool)), ValueError, "active"),
]


@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in SCHEDULE_BAD], ids=[b[0] for b in SCHEDULE_BAD])
def test_schedule_verify_bad_input_names_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        _schedule(**kw)


def test_schedule_verify_sps_exactly_long_enough():
    _schedule()
    _schedule(sps=torch.ones(7))  # exactly R·(γ+1) + 1 entries


# --- pack_verify --------------------------------------------------------------

PV_GOOD = dict(anchor=torch.tensor([1, 2], dtype=torch.int32),
               tokens=torch.tensor([[3, 4, 5], [6, 7, 8]], dtype=torch.int32),
               lengths=torch.tensor([2, 0], dtype=torch.int32), cu_verify=torch.tensor([0, 3, 4], dtype=torch.int32),
               start_pos=torch.tensor([0, 9], dtype=torch.int32))


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# Dropped as the same change as a generated pack_verify case (see the module docstring):
# cu_verify float32 (dtype-float32), anchor int16 (dtype-int16), tokens [2] (rank-1),
# tokens float32 (dtype-float32), lengths float32 (dtype-float32), start_pos [1, 2]
# (rank+1), start_pos float32 (dtype-float32).
PACK_BAD = [
    ("lengths_above_gamma", dict(lengths=_i32(4, 0), cu_verify=_i32(0, 5, 6)), ValueError, "lengths"),
    ("lengths_negative", dict(lengths=_i32(-1, 0), cu_verify=_i32(0, 0, 1)), ValueError, "lengths"),
    ("cu_verify_not_lengths_plus_one", dict(cu_verify=_i32(0, 2, 3)), ValueError, "cu_verify"),  # 2 rows, lengths 2
    ("cu_verify_not_from_zero", dict(cu_verify=_i32(1, 4, 5)), ValueError, "cu_verify"),
    ("cu_verify_shrinking", dict(cu_verify=_i32(0, 3, 2)), ValueError, "cu_verify"),
    ("cu_verify_shape", dict(cu_verify=_i32(0, 3)), ValueError, "cu_verify"),
    # anchor binds R: the error is at tokens, and names anchor as where R = 3 comes from
    ("anchor_shape", dict(anchor=_i32(1, 2, 3)), ValueError, "anchor"),
    ("lengths_shape", dict(lengths=_i32(2)), ValueError, "lengths"),
    ("start_pos_negative", dict(start_pos=_i32(0, -1)), ValueError, "start_pos"),
    # the static bucket, int32 positions and the page table (the generated cases cover the requires
    # pairs page_table / page_size / num_pages and the bounds of the int arguments)
    ("num_rows_below_live_rows", dict(num_rows=3), ValueError, "^num_rows"),  # cu_verify[R] = 4
    ("start_pos_past_int32", dict(start_pos=_i32(0, 2**31 - 3)), ValueError, r"^start_pos \+ gamma"),  # γ = 3
    ("page_table_too_narrow", dict(page_table=torch.tensor([[0, 1], [2, 3]]), page_size=4), ValueError,
     "^page_table has 2 pages"),  # position 9 is in page column 2
    ("page_id_past_num_pages", dict(page_table=torch.tensor([[0, 1, 2], [3, 4, 5]]), page_size=4, num_pages=5),
     ValueError, r"^page_table holds page ids outside \[0, 5\)"),
    ("page_id_negative", dict(page_table=torch.tensor([[-1, 0, 0], [0, 0, 1]]), page_size=4), ValueError,
     "^page_table holds page ids"),
    ("scratch_slot_outside_cache", dict(page_table=torch.tensor([[0, 1, 1], [0, 1, 1]]), page_size=4, num_pages=2,
                                        scratch_slot=8), ValueError, "^scratch_slot"),
]


@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in PACK_BAD], ids=[b[0] for b in PACK_BAD])
def test_pack_verify_bad_input_names_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        dk.pack_verify(**dict(PV_GOOD, **kw))


def test_pack_verify_table_base_is_valid():
    dk.pack_verify(**PV_GOOD)
    dk.pack_verify(**PV_GOOD, num_rows=4, page_table=torch.tensor([[0, 1, 2], [3, 4, 5]]), page_size=4, num_pages=6,
                   scratch_slot=23)


# --- append_verify_kv ---------------------------------------------------------

def _append_good():
    g = torch.Generator().manual_seed(3)
    return dict(key=torch.randn(4, 2, 8, generator=g), value=torch.randn(4, 2, 8, generator=g),
                k_cache=torch.zeros(3, 5, 2, 8), v_cache=torch.zeros(3, 5, 2, 8),
                slot_mapping=torch.tensor([0, 14, 7, 7]))


# Dropped as the same change as a generated append_verify_kv case: key float64 (dtype-float64),
# k_cache [3, 5, 3, 8] (dim2(Hkv)+1), slot_mapping float32 (dtype-float32), slot_mapping [5] (dim0(T)+1).
APPEND_BAD = [
    ("key_half", dict(key=lambda d: d["key"].half()), TypeError, "^key has dtype float16 but k_cache has float32"),
    ("value_bf16", dict(value=lambda d: d["value"].bfloat16()), TypeError, "^value has dtype bfloat16"),
    ("v_cache_half", dict(v_cache=lambda d: d["v_cache"].half()), TypeError, "^v_cache has dtype float16"),
    ("page_size_zero", dict(k_cache=lambda d: d["k_cache"][:, :0], v_cache=lambda d: d["v_cache"][:, :0]),
     ValueError, "^k_cache must have a positive page size"),
    ("slot_negative", dict(slot_mapping=torch.tensor([0, -1, 7, 7])), ValueError, r"^slot_mapping holds slots outside"),
    ("slot_past_cache", dict(slot_mapping=torch.tensor([0, 15, 7, 7])), ValueError,
     r"^slot_mapping holds slots outside \[0, 15\)"),
]


@pytest.mark.parametrize("backend", BACKENDS["append_verify_kv"])
@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in APPEND_BAD], ids=[b[0] for b in APPEND_BAD])
def test_append_verify_kv_bad_input_names_the_argument(kw, exc, match, backend, value_checks_on):
    d = _append_good()
    call_on_device("append_verify_kv", backend, d)  # the base is valid
    bad = {k: (kw[k](d) if callable(kw.get(k)) else kw.get(k, v)) for k, v in d.items()}
    with pytest.raises(exc, match=match):
        call_on_device("append_verify_kv", backend, bad)


# --- philox_uniform -----------------------------------------------------------
# Its former table (seed int32, offset [0, 1], position 2**16, stream -1) is the same
# changes as the generated cases seed-dtype-int32, offset-numel-2, position-above-hi and
# stream-below-lo: nothing op-specific is left.


# ---------------------------------------------------------------------------
# 3. Device mismatches beyond the generated ones
# ---------------------------------------------------------------------------

# The generated device cases move one argument of example(); these are the arguments it
# does not give (the RNN head). The others were dropped here as the same change as the
# generated markov_draft-<name>-device cases.
MARKOV_ONLY_HERE = ["rnn_weight", "rnn_bias"]


@pytest.mark.parametrize("name", MARKOV_ONLY_HERE)
def test_markov_draft_device_mismatch_names_the_argument(name):
    """One argument on another device. With CUDA: that argument on the CPU; without it, on the
    meta device (the op then dispatches to its fake, which runs the same argument checks)."""
    d = with_rnn_head(small_inputs())
    if torch.cuda.is_available():
        d = {k: (v.cuda() if k != name and isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    else:
        d[name] = d[name].to("meta")
    with pytest.raises(ValueError, match=f"{name}.*device|device.*{name}"):
        dk.markov_draft(**d, backend="reference")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a mismatch between two real accelerators needs two GPUs")
def test_markov_draft_device_mismatch_between_gpus():
    d = {k: (v.to("cuda:0") if isinstance(v, torch.Tensor) else v) for k, v in small_inputs().items()}
    d["seed"] = d["seed"].to("cuda:1")
    with pytest.raises(ValueError, match="seed"):
        dk.markov_draft(**d, backend="reference")


# rejection_sample's former test_device_mismatch (seed on the CPU, the rest on CUDA,
# reference backend) is the generated case rejection_sample-seed-device on a CUDA machine.


# --- schedule_verify: capacity, NaN; verify_capacity -------------------------

SCHEDULE_CAPACITY_BAD = [
    ("history_nan", dict(mode="async", history=torch.tensor([[0.9, float("nan")], [0.7, 0.7]])), ValueError,
     "history contains NaN"),
    ("sps_nan", dict(sps=torch.tensor([1.0] * 6 + [float("nan")])), ValueError, "sps contains NaN"),
    ("survival_nan_async", dict(survival=torch.tensor([[0.9, 0.5], [float("nan"), 0.0]]), mode="async",
                                capacity=torch.tensor(2)), ValueError, "survival contains NaN"),
    ("async_history_and_capacity", dict(mode="async", history=SV_SURVIVAL, capacity=torch.tensor(2)), ValueError,
     "exactly one of history .* and capacity .*got both"),
    ("async_neither", dict(mode="async"), ValueError, "exactly one of history .* and capacity .*got neither"),
    ("capacity_in_causal", dict(capacity=torch.tensor(2)), ValueError, "capacity is for mode='async' only"),
    ("capacity_negative", dict(mode="async", capacity=torch.tensor(-1)), ValueError, "capacity must be >= 0"),
    ("capacity_float", dict(mode="async", capacity=torch.tensor(2.0)), TypeError, "capacity must have dtype"),
    ("capacity_two_elements", dict(mode="async", capacity=torch.tensor([2, 3])), ValueError, "capacity must be a 0-d"),
    ("capacity_list", dict(mode="async", capacity=[2]), TypeError, "capacity must be a torch.Tensor"),
]


@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in SCHEDULE_CAPACITY_BAD],
                         ids=[b[0] for b in SCHEDULE_CAPACITY_BAD])
def test_schedule_verify_capacity_and_nan_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        _schedule(**kw)


def _capacity(**kw):
    return dk.verify_capacity(kw.pop("history", SV_SURVIVAL), kw.pop("sps", SV_SPS), **kw)


VERIFY_CAPACITY_BAD = [
    ("history_nan", dict(history=torch.tensor([[0.9, float("nan")], [0.7, 0.7]])), ValueError,
     "history contains NaN"),
    ("history_inf", dict(history=torch.tensor([[float("inf"), 0.5], [0.7, 0.7]])), ValueError, "history"),
    ("history_increasing", dict(history=torch.tensor([[0.5, 0.8], [0.7, 0.7]])), ValueError, "non-increasing"),
    ("history_above_one", dict(history=torch.tensor([[1.5, 0.5], [0.7, 0.7]])), ValueError, r"history must lie"),
    ("sps_nan", dict(sps=torch.tensor([1.0] * 6 + [float("nan")])), ValueError, "sps contains NaN"),
    ("sps_negative", dict(sps=-torch.ones(7)), ValueError, "sps must be non-negative"),
    ("sps_too_short", dict(sps=torch.ones(6)), ValueError, r"sps must cover .*length >= 7"),
]


@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in VERIFY_CAPACITY_BAD], ids=[b[0] for b in VERIFY_CAPACITY_BAD])
def test_verify_capacity_bad_input_names_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        _capacity(**kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_checks_are_on_for_every_backend(backend, value_checks_on):
    """The NaN checks run before any backend (value checks on); off, the kernels define NaN as no candidate."""
    if backend not in available_backends(MODULES["verify_capacity"]):
        pytest.skip(f"{backend} not available here")
    nan = torch.tensor([[0.9, float("nan")], [0.7, 0.7]])
    with pytest.raises(ValueError, match="history contains NaN"):
        dk.verify_capacity(to_device(nan), to_device(SV_SPS), backend=backend)
    with pytest.raises(ValueError, match="survival contains NaN"):
        dk.schedule_verify(to_device(nan), to_device(SV_SPS), backend=backend)
    dk.set_value_checks(False)
    try:
        assert int(dk.verify_capacity(to_device(nan), to_device(SV_SPS), backend=backend)) == 3
        assert dk.schedule_verify(to_device(nan), to_device(SV_SPS), backend=backend).lengths.tolist() == [1, 2]
    finally:
        dk.set_value_checks(None)


# --- tree_rejection_sample ------------------------------------------------------


def _tree_good():
    return MODULES["tree_rejection_sample"].example()


def _tree_at(name, index, v):
    def f(d):
        t = d[name].clone()
        t[index] = v
        return {**d, name: t}
    return f


# The example: request 0 has 5 nodes (parents -1, -1, 0, 0, 2), request 1 none, request 2 four of 5.
TREE_BAD = [
    ("num_nodes_above_N", _tree_at("num_nodes", 1, 6), ValueError, "^num_nodes must lie in"),
    ("num_nodes_negative", _tree_at("num_nodes", 1, -1), ValueError, "^num_nodes must lie in"),
    ("cu_verify_inconsistent", _tree_at("cu_verify", 2, 8), ValueError, "^cu_verify must start at 0 and grow by "
     "num_nodes"),
    ("cu_verify_not_from_zero", _set("cu_verify", lambda t: t + 1), ValueError, "^cu_verify"),
    ("rows_past_target_logits", _set("target_logits", lambda t: t[:-1]), ValueError, "^target_logits has 11 rows"),
    ("parent_is_self", _tree_at("tree_parents", (0, 3), 3), ValueError, "^tree_parents.*node 3 has parent 3"),
    ("parent_after_self", _tree_at("tree_parents", (2, 1), 3), ValueError, "^tree_parents.*request 2, node 1"),
    ("parent_below_anchor", _tree_at("tree_parents", (0, 2), -2), ValueError, "^tree_parents.*parent -2"),
    ("token_too_large", _tree_at("tree_tokens", (0, 4), 13), ValueError, "^tree_tokens holds token ids outside"),
    ("token_negative", _tree_at("tree_tokens", (2, 0), -1), ValueError, "^tree_tokens holds token ids outside"),
    ("target_logits_nan", _tree_at("target_logits", (3, 2), math.nan), ValueError, "^target_logits contains NaN"),
    ("temperature_negative", _tree_at("temperature", 0, -1.0), ValueError, "^temperature must be >= 0"),
    ("top_p_zero", _tree_at("top_p", 0, 0.0), ValueError, "^top_p must lie in"),
    ("draft_probs_unnormalised", _set("draft_probs", lambda t: t * 1.5), ValueError, "^draft_probs rows.*sum to 1"),
    ("draft_probs_negative", _tree_at("draft_probs", (0, 0, 0), -0.5), ValueError, "^draft_probs must be non-neg"),
    ("siblings_differ", _set("draft_probs", lambda t: torch.softmax(torch.randn(t.shape), -1)), ValueError,
     "^draft_probs rows of siblings must be equal"),
    ("too_many_nodes", lambda d: {**d, "tree_tokens": torch.zeros(3, 65535, dtype=torch.int32),
                                  "tree_parents": torch.zeros(3, 65535, dtype=torch.int32), "draft_probs": None},
     ValueError, "^tree_tokens allows at most 65534 nodes"),
]


@pytest.mark.parametrize("backend", BACKENDS["tree_rejection_sample"])
@pytest.mark.parametrize("mutate,exc,match", [row[1:] for row in TREE_BAD], ids=[row[0] for row in TREE_BAD])
def test_tree_rejection_sample_bad_input_names_the_argument(mutate, exc, match, backend, value_checks_on):
    with pytest.raises(exc, match=match):
        call_on_device("tree_rejection_sample", backend, mutate(_tree_good()))


def test_tree_rejection_sample_edge_values_pass(value_checks_on):
    """Allowed: a node past num_nodes with any parent or token, and one-hot candidates that repeat
    (exactness is kept: a repeat is never accepted)."""
    d = _tree_good()
    d["tree_parents"][2, 4] = 9  # past num_nodes[2] = 4: ignored
    d["tree_tokens"][2, 4] = -7
    d["tree_tokens"][0, 1] = d["tree_tokens"][0, 0]  # repeated root candidates
    d["draft_probs"] = None
    for backend in BACKENDS["tree_rejection_sample"]:
        call_on_device("tree_rejection_sample", backend, d)


# --- tree_verify_layout ---------------------------------------------------------

LAYOUT_BAD = [
    ("num_nodes_above_N", lambda d: _tree_at("num_nodes", 1, 6)(d), ValueError, "^num_nodes must lie in"),
    ("cu_verify_inconsistent", _tree_at("cu_verify", 2, 8), ValueError, "^cu_verify must start at 0"),
    ("num_rows_too_small", lambda d: {**d, "num_rows": 11}, ValueError, "^num_rows = 11 is smaller"),
    ("num_rows_too_small_default_cu", lambda d: {**d, "cu_verify": None, "num_rows": 11}, ValueError,
     "^num_rows = 11 is smaller than the batch: 12"),
    ("parent_is_self", _tree_at("tree_parents", (0, 2), 2), ValueError, "^tree_parents.*node 2 has parent 2"),
    ("parent_below_anchor", _tree_at("tree_parents", (2, 3), -3), ValueError, "^tree_parents.*parent -3"),
    ("start_pos_negative", _tree_at("start_pos", 0, -1), ValueError, "^start_pos must be non-negative"),
    ("start_pos_overflow", _tree_at("start_pos", 0, 2**31 - 3), ValueError, "^start_pos \\+ N must be < 2\\^31"),
    ("too_many_nodes", lambda d: {**d, "tree_parents": torch.zeros(3, 64, dtype=torch.int32)}, ValueError,
     "^tree_parents allows at most 63 nodes"),
]


@pytest.mark.parametrize("backend", BACKENDS["tree_verify_layout"])
@pytest.mark.parametrize("mutate,exc,match", [row[1:] for row in LAYOUT_BAD], ids=[row[0] for row in LAYOUT_BAD])
def test_tree_verify_layout_bad_input_names_the_argument(mutate, exc, match, backend, value_checks_on):
    with pytest.raises(exc, match=match):
        call_on_device("tree_verify_layout", backend, mutate(MODULES["tree_verify_layout"].example()))


# --- compact_accepted_kv --------------------------------------------------------

COMPACT_BAD = [
    ("num_accepted_above_N", _tree_at("num_accepted", 1, 6), ValueError, "^num_accepted must lie in"),
    ("num_accepted_negative", _tree_at("num_accepted", 0, -1), ValueError, "^num_accepted must lie in"),
    ("path_not_increasing", _tree_at("accepted_nodes", (0, 1), 0), ValueError,
     "^accepted_nodes.*strictly increasing.*request 0 has \\[0, 0, 4\\]"),
    ("path_node_past_N", _tree_at("accepted_nodes", (2, 1), 5), ValueError, "^accepted_nodes.*request 2"),
    ("path_node_negative", _tree_at("accepted_nodes", (2, 0), -1), ValueError, "^accepted_nodes.*request 2"),
    ("start_pos_negative", _tree_at("start_pos", 1, -2), ValueError, "^start_pos must be non-negative"),
    ("page_table_too_narrow", _set("page_table", lambda t: t[:, :1]), ValueError, "^page_table has 1 pages per "
     "request but request 0 reads position 6"),
    ("page_id_out_of_cache", _tree_at("page_table", (2, 0), 8), ValueError, "^page_table holds page ids outside"),
    ("v_cache_dtype", _set("v_cache", lambda t: t.half()), TypeError, "^v_cache has dtype float16"),
]


@pytest.mark.parametrize("backend", BACKENDS["compact_accepted_kv"])
@pytest.mark.parametrize("mutate,exc,match", [row[1:] for row in COMPACT_BAD], ids=[row[0] for row in COMPACT_BAD])
def test_compact_accepted_kv_bad_input_names_the_argument(mutate, exc, match, backend, value_checks_on):
    good = MODULES["compact_accepted_kv"].example()
    before = good["k_cache"].clone()
    bad = mutate(good)
    with pytest.raises(exc, match=match):
        call_on_device("compact_accepted_kv", backend, bad)
    assert torch.equal(good["k_cache"], before)  # rejected before anything moved
