"""Each op's one spec: its public docstring has math, shapes and a runnable example; the README lists the registry.

The public function's docstring is the only place an op's contract is
written (the other layers say "implements dspark_kernels.<op>" and describe
their strategy), so its Examples block runs here as a doctest.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re

import pytest

import dspark_kernels as dk
from dspark_kernels.ops import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("op", OPS)
def test_public_docstring_is_the_spec(op):
    doc = getattr(dk, op).__doc__ or ""
    for section in ("Args:", "Returns:", "Examples:"):
        assert section in doc, (op, section)
    assert "Math" in doc or "=" in doc.split("Args:")[0], f"{op}: no math before Args"
    module = importlib.import_module(f"dspark_kernels.ops.{op}")
    assert getattr(dk, op) is getattr(module, op)


@pytest.mark.parametrize("op", OPS)
def test_docstring_examples_run(op):
    module = importlib.import_module(f"dspark_kernels.ops.{op}")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(getattr(module, op), op) if t.examples]
    assert tests, f"{op} has no doctest example"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{op}: {runner.failures} doctest failures (run pytest --doctest-modules on it)"


def test_other_layers_point_at_the_spec():
    for op in OPS:
        for layer in ("reference", "triton"):
            path = os.path.join(ROOT, "dspark_kernels", layer, f"{op}.py")
            if os.path.exists(path):
                with open(path) as f:
                    head = f.read(400)
                assert f"implements dspark_kernels.{op}" in head.replace("\n", " "), path


def test_readme_op_table_lists_the_registry():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text.split("## Ops", 1)[1].split("\n\n", 3)[2]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert listed == list(OPS), (listed, OPS)


@pytest.mark.parametrize("op", OPS)
def test_table_defaults_are_the_signatures(op):
    """A value argument's default is written twice (the signature is the spec; the table fills records):
    they must agree."""
    import inspect

    module = importlib.import_module(f"dspark_kernels.ops.{op}")
    params = inspect.signature(getattr(module, op)).parameters
    assert [a.name for a in module.OP.args] == [p for p in params if p != "backend"], op
    for arg in module.OP.args:
        default = params[arg.name].default
        if default is inspect.Parameter.empty:
            continue
        assert arg.default == default, (op, arg.name, arg.default, default)
