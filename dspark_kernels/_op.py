"""One table per op: its arguments spelled once, everything else derived.

An op module declares ``OP = Op(name, args, returns, ...)`` where ``args`` is
a table of argument specs (``tensor``, ``scalar_tensor``, ``value``). From it
this module derives

- the torch.library schema of ``torch.ops.dspark.<name>`` (plus a trailing
  ``str backend``), its CPU and CUDA kernel (check, then dispatch to the
  chosen implementation) and its fake (check, then the op's shape function);
- the argument record: a NamedTuple with one field per argument, built once
  in the op body and handed to the extra checks, the value checks, the fake
  and every implementation (reference, Triton launcher, CUDA glue);
- the metadata checks: rank, dtype, shape (symbols bind on first use, later
  uses must agree: ``"R, G+1"``), one device, argument dependencies; every
  error names the argument (TypeError for type/dtype, ValueError otherwise);
- the public call: ``OP(locals())`` from the public function, whose explicit
  signature and docstring are the op's one spec.

An op that writes into some of its tensor arguments marks them
``tensor(..., mutated=True)``: the schema then declares them ``Tensor(a!)``,
``Tensor(b!)``, ... (one alias set each, in table order), so that functionalization
(torch.compile, opcheck) knows what the op writes; such an op usually returns
``"()"`` and its fake returns None.

Value checks (reading tensor values) are the op's ``values(a)`` and run only
when dspark_kernels._checks says so for the device (set_value_checks).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import _checks
from ._backend import Implementations

FLOAT = (torch.float32, torch.float16, torch.bfloat16)
FLOAT64 = FLOAT + (torch.float64,)
INT = (torch.int32, torch.int64)
INT64 = (torch.int64,)
BOOL = (torch.bool,)

_IDENT = re.compile(r"^[A-Za-z_]\w*$")
_NO_BUILTINS = {"__builtins__": {}}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass(frozen=True)
class Arg:
    """One argument of an op (use the constructors tensor / scalar_tensor / value)."""

    name: str
    kind: str  # schema type of the value: Tensor, int, float, bool, str
    optional: bool = False
    dtypes: tuple = ()
    dims: tuple | None = None  # tensors: one str per dimension (symbol or expression); None: a 0-d / 1-element tensor
    requires: tuple = ()  # (other argument, why) pairs: this one is meaningful only with the other
    choices: tuple = ()  # str / int values: the allowed ones
    lo: Any = None  # int / float values: inclusive bounds
    hi: Any = None
    default: Any = None  # the public function's default (record() fills it in)
    mutated: bool = False  # tensors: the op writes into it (schema Tensor(x!), alias set from the Op)

    @property
    def schema(self) -> str:
        return f"{self.kind}{'?' if self.optional else ''} {self.name}"

    def schema_with_alias(self, alias: str | None) -> str:
        """The schema entry, with ``(alias!)`` after the type when the op writes into this argument."""
        if alias is None:
            return self.schema
        return f"{self.kind}({alias}!){'?' if self.optional else ''} {self.name}"


def tensor(name: str, dims: str, dtypes: Sequence[torch.dtype], *, optional: bool = False,
           requires: tuple = (), mutated: bool = False) -> Arg:
    """A tensor argument. dims: comma list, one entry per dimension: a symbol (binds on first
    use, must agree later) or an expression of bound symbols (``R+1``, ``d+r``, ``2*r``).
    mutated: the op writes into this tensor in place (declared in the schema)."""
    parts = tuple(p.strip() for p in dims.split(",")) if dims.strip() else ()
    return Arg(name, "Tensor", optional, tuple(dtypes), parts, tuple(requires), mutated=mutated)


def scalar_tensor(name: str, dtypes: Sequence[torch.dtype], *, optional: bool = False,
                  requires: tuple = ()) -> Arg:
    """A 0-d (or one-element) tensor; the record holds it reshaped to 0-d."""
    return Arg(name, "Tensor", optional, tuple(dtypes), None, tuple(requires))


def value(name: str, kind: str, *, optional: bool = False, choices: tuple = (), lo=None, hi=None,
          default=None, requires: tuple = ()) -> Arg:
    """A plain int / float / bool / str argument (schema scalar); default: the public function's.
    requires: (other argument, why) pairs, as for tensors (checked when this one is not None)."""
    assert kind in ("int", "float", "bool", "str"), kind
    return Arg(name, kind, optional, choices=tuple(choices), lo=lo, hi=hi, default=default,
               requires=tuple(requires))


class Op:
    """An op defined from its argument table (see the module docstring).

    name: the op's name in the dspark namespace. args: the table, in schema
    order. returns: the schema's return type. impls: its Implementations.
    fake(a): outputs' shapes (new_empty tensors). check(a): metadata checks
    the table cannot say (exclusions, limits). values(a): value checks.
    prepare(a) -> a: normalisation done once before the implementation runs.
    wrap(out, kwargs): the public function's return value from the op's.
    kernel_op: the CUDA extension's op that takes the record's fields (its
    schema is defined here; default: impls.cuda when that names an op).
    """

    def __init__(self, name: str, args: Sequence[Arg], returns: str, *, impls: Implementations,
                 fake: Callable, check: Callable | None = None, values: Callable | None = None,
                 prepare: Callable | None = None, wrap: Callable | None = None, kernel_op: str | None = None):
        self.name = name
        self.args = tuple(args)
        self.impls = impls
        self._fake_fn, self._check_fn, self._values_fn = fake, check, values
        self._prepare, self._wrap = prepare, wrap
        self.Args = collections.namedtuple(f"{''.join(w.title() for w in name.split('_'))}Args",
                                           [a.name for a in self.args])
        self.tensors = tuple(a for a in self.args if a.kind == "Tensor")
        # (name, is a tensor, may be None) per argument, for the public call's type check.
        self._public = tuple((a.name, a.kind == "Tensor", a.optional) for a in self.args)
        self._bools = tuple(a.name for a in self.args if a.kind == "bool")
        self._numbers = tuple(a for a in self.args if a.kind in ("int", "float"))
        self._scalars = tuple(a.name for a in self.tensors if a.dims is None)
        self._dim_code = {a.name: tuple(None if _IDENT.match(d) or d.isdigit() else compile(d, a.name, "eval")
                                        for d in a.dims) for a in self.tensors if a.dims is not None}
        self._plan = tuple(self._plan_of(i, spec) for i, spec in enumerate(self.args))
        # Arguments the op writes into get one alias set each: Tensor(a!), Tensor(b!), ...
        mutated = [a.name for a in self.args if a.mutated]
        assert all(a.kind == "Tensor" for a in self.args if a.mutated), name
        self.mutated = tuple(mutated)
        aliases = {n: chr(ord("a") + i) for i, n in enumerate(mutated)}
        entries = ", ".join(a.schema_with_alias(aliases.get(a.name)) for a in self.args)
        self.schema = f"({entries}, str backend) -> {returns}"
        qualname = f"dspark::{name}"
        torch.library.define(qualname, self.schema)
        torch.library.impl(qualname, ("cpu", "cuda"), self._kernel)
        torch.library.register_fake(qualname, self._fake)
        self._call = getattr(getattr(torch.ops.dspark, name), "default")
        kernel_op = kernel_op or (impls.cuda if impls.cuda is not None and ":" not in impls.cuda else None)
        if kernel_op is not None:
            # The CUDA extension's kernel op takes the record's fields in order (csrc/torch_bindings.cpp).
            torch.library.define(f"dspark::{kernel_op}", f"({entries}) -> {returns}")

    # ------------------------------------------------------------------ records and checks

    def record(self, **kwargs) -> tuple:
        """The argument record from keyword arguments (absent ones: their default, or None)."""
        unknown = set(kwargs) - set(self.Args._fields)
        if unknown:
            raise TypeError(f"{self.name} has no argument(s) {sorted(unknown)}")
        return self.Args(*(kwargs.get(a.name, a.default) for a in self.args))

    def check(self, a: tuple) -> dict:
        """Every metadata check of the table, then the op's own; returns the bound dimension symbols.

        A fast pass over a precompiled plan accepts good input (~0.5 us per
        argument); anything it does not accept goes to the explaining pass,
        which raises the error that names the argument.
        """
        dims = self._fast_check(a)
        if dims is None:
            dims = self._explain(a)
        if self._check_fn is not None:
            self._check_fn(a, dims)
        return dims

    def _plan_of(self, index: int, spec: Arg) -> tuple:
        names = [a.name for a in self.args]
        requires = tuple(names.index(other) for other, _ in spec.requires)
        if spec.kind != "Tensor":
            def ok(x, spec=spec):
                try:
                    self._check_value(spec, x)
                except (TypeError, ValueError):
                    return False
                return True
            return index, False, spec.optional, requires, None, None, (), ok
        dimplan = ()
        if spec.dims is not None:
            dimplan = tuple((i, 0, int(d)) if code is None and d.isdigit() else (i, 1, d) if code is None else (i, 2, code)
                            for i, (d, code) in enumerate(zip(spec.dims, self._dim_code[spec.name])))
        ndim = None if spec.dims is None else len(spec.dims)
        return index, True, spec.optional, requires, frozenset(spec.dtypes), ndim, dimplan, None

    def _fast_check(self, a: tuple) -> dict | None:
        """The table's checks without messages: the bound dims, or None at the first doubt."""
        dims: dict[str, int] = {}
        device = None
        for index, is_tensor, optional, requires, dtypes, ndim, dimplan, value_ok in self._plan:
            x = a[index]
            if x is None:
                if optional:
                    continue
                return None
            for j in requires:
                if a[j] is None:
                    return None
            if not is_tensor:
                if not value_ok(x):
                    return None
                continue
            if not isinstance(x, torch.Tensor):
                return None
            if device is None:
                device = x.device
            elif x.device != device:
                return None
            if ndim is None:
                if x.numel() != 1 or x.dim() > 1:
                    return None
            elif x.dim() != ndim:
                return None
            if dtypes and x.dtype not in dtypes:
                return None
            shape = x.shape
            for i, mode, val in dimplan:
                n = shape[i]
                if mode == 1:
                    bound = dims.get(val)
                    if bound is None:
                        dims[val] = n
                    elif bound != n:
                        return None
                elif mode == 0:
                    if n != val:
                        return None
                elif n != eval(val, _NO_BUILTINS, dims):
                    return None
        return dims

    def _explain(self, a: tuple) -> dict:
        """The same checks as _fast_check, raising the error that names the argument."""
        dims: dict[str, int] = {}
        origin: dict[str, str] = {}
        ref = None
        for spec, x in zip(self.args, a):
            if x is None:
                if not spec.optional:
                    raise TypeError(f"{spec.name} is required, got None")
                continue
            for other, why in spec.requires:
                if getattr(a, other) is None:
                    raise ValueError(f"{spec.name} needs {other}: {why}")
            if spec.kind != "Tensor":
                self._check_value(spec, x)
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{spec.name} must be a torch.Tensor, got {type(x).__name__}")
            if ref is None:
                ref = (spec.name, x.device)
            elif x.device != ref[1]:
                raise ValueError(f"{spec.name} is on {x.device} but {ref[0]} is on {ref[1]}; "
                                 "all inputs must share one device")
            if spec.dims is None:
                if x.numel() != 1 or x.dim() > 1:
                    raise ValueError(f"{spec.name} must be a 0-d (or one-element) tensor, got shape {tuple(x.shape)}")
            elif x.dim() != len(spec.dims):
                raise ValueError(f"{spec.name} must have {len(spec.dims)} dimensions ({', '.join(spec.dims)}), "
                                 f"got shape {tuple(x.shape)}")
            if spec.dtypes and x.dtype not in spec.dtypes:
                raise TypeError(f"{spec.name} must have dtype in ({', '.join(map(_dtype_name, spec.dtypes))}), "
                                f"got {_dtype_name(x.dtype)}")
            if spec.dims is not None:
                self._check_dims(spec, x, dims, origin)
        return dims

    def _check_dims(self, spec: Arg, x: torch.Tensor, dims: dict, origin: dict) -> None:
        expected = []
        for i, (sym, code) in enumerate(zip(spec.dims, self._dim_code[spec.name])):
            if code is None and sym.isdigit():
                expected.append(int(sym))
            elif code is None:
                if sym not in dims:
                    dims[sym], origin[sym] = int(x.shape[i]), f"{spec.name}.shape[{i}]"
                expected.append(dims[sym])
            else:
                expected.append(eval(code, _NO_BUILTINS, dims))
        if list(x.shape) != expected:
            used = sorted({s for s in dims if any(re.search(rf"\b{s}\b", d) for d in spec.dims)})
            where = ", ".join(f"{s} = {dims[s]} from {origin[s]}" for s in used if origin[s].split(".")[0] != spec.name)
            raise ValueError(f"{spec.name} must have shape ({', '.join(spec.dims)}) = {tuple(expected)}, "
                             f"got {tuple(x.shape)}" + (f" ({where})" if where else ""))

    @staticmethod
    def _check_value(spec: Arg, x) -> None:
        types = {"int": int, "float": (int, float), "bool": bool, "str": str}[spec.kind]
        if not isinstance(x, types) or (spec.kind in ("int", "float") and isinstance(x, bool)):
            raise TypeError(f"{spec.name} must be {spec.kind}, got {type(x).__name__}")
        if spec.choices and x not in spec.choices:
            raise ValueError(f"{spec.name} must be one of {spec.choices}, got {x!r}")
        if (spec.lo is not None and x < spec.lo) or (spec.hi is not None and x > spec.hi):
            raise ValueError(f"{spec.name} must be in [{spec.lo}, {spec.hi}], got {x}")

    def normalize(self, a: tuple) -> tuple:
        """Scalar tensors reshaped to 0-d, then the op's prepare(a)."""
        for name in self._scalars:
            x = getattr(a, name)
            if x is not None and x.dim():
                a = a._replace(**{name: x.reshape(())})
        return self._prepare(a) if self._prepare is not None else a

    # ------------------------------------------------------------------ torch.library kernels

    def _kernel(self, *args):
        a = self.Args(*args[:-1])
        device_type = args[0].device.type if isinstance(args[0], torch.Tensor) else self._device_type(a)
        self.check(a)
        a = self.normalize(a)
        if self._values_fn is not None and _checks.value_checks_enabled(device_type):
            self._values_fn(a)
        return self.impls.bound(args[-1], device_type)(a)

    def _fake(self, *args):
        a = self.Args(*args[:-1])
        self.check(a)
        return self._fake_fn(a)

    def _device_type(self, a: tuple) -> str:
        for spec in self.tensors:
            x = getattr(a, spec.name)
            if isinstance(x, torch.Tensor):
                return x.device.type
        return "cpu"

    def run(self, backend: str, a: tuple):
        """One implementation on a record, with no check at all (for tests and benchmarks of kernels)."""
        a = self.normalize(a)
        return self.impls.bound(backend, self._device_type(a))(a)

    # ------------------------------------------------------------------ the public call

    def __call__(self, kwargs: dict):
        """Call the op from the public function's ``locals()`` (its arguments plus ``backend``).

        A list where a tensor belongs is a TypeError naming the argument, not
        the dispatcher's schema cast error: the type check runs when the cast
        fails, so a good call pays nothing for it.
        """
        for name in self._bools:
            kwargs[name] = bool(kwargs[name])
        for spec in self._numbers:  # the dispatcher would turn True into 1 without a word
            if isinstance(kwargs[spec.name], bool):
                raise TypeError(f"{spec.name} must be {spec.kind}, got bool")
        try:
            out = self._call(*[kwargs[name] for name, _, _ in self._public], kwargs.get("backend") or "")
        except (TypeError, RuntimeError):
            for spec in self.args:
                x = kwargs[spec.name]
                if x is None and spec.optional:
                    continue
                if spec.kind == "Tensor" and not isinstance(x, torch.Tensor):
                    raise TypeError(f"{spec.name} must be a torch.Tensor, got {type(x).__name__}") from None
                if spec.kind != "Tensor":
                    self._check_value(spec, x)  # raises the TypeError that names it
            raise
        return self._wrap(out, kwargs) if self._wrap is not None else out
