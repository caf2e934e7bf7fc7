"""Op registry: schemas, fakes, torch.compile, and explicit backend choice."""

import importlib

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import BackendUnavailableError
from dspark_kernels.ops import OPS
from dspark_kernels.ops import markov_draft as md_op
from dspark_kernels.ops import philox_uniform as pu_op
from dspark_kernels.ops import rejection_sample as rs_op


def _markov_args(R=3, g=4, V=11, r=5, d=6):
    torch.manual_seed(0)
    return dict(
        base_logits=torch.randn(R, g, V),
        anchor=torch.tensor([1, 2, 3][:R]),
        w1=torch.randn(V, r),
        w2=torch.randn(V, r),
        temperature=torch.tensor([1.0, 0.0, 0.5][:R]),
        seed=torch.arange(R, dtype=torch.int64),
        offset=torch.tensor(7, dtype=torch.int64),
        hidden=torch.randn(R, g, d),
        conf_weight=torch.randn(d + r),
        conf_bias=torch.tensor(0.1),
        sts_temperature=torch.full((g,), 1.3),
        gate_weight=torch.randn(r, d + r),
        gate_bias=torch.randn(r),
        rnn_weight=None,
        rnn_bias=None,
        return_draft_probs=True,
        return_draft_logits=True,
    )


def _rejection_args(R=3, g=4, V=11):
    torch.manual_seed(1)
    lengths = torch.tensor([4, 0, 2][:R], dtype=torch.int32)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths + 1, 0)
    return dict(
        target_logits=torch.randn(int(cu[-1]) + 2, V),
        draft_tokens=torch.randint(0, V, (R, g)),
        draft_probs=torch.softmax(torch.randn(R, g, V), -1),
        lengths=lengths,
        cu_verify=cu,
        temperature=torch.tensor([1.0, 0.0, 0.7][:R]),
        seed=torch.arange(R, dtype=torch.int64) + 11,
        offset=torch.tensor(3, dtype=torch.int64),
        top_k=torch.tensor([3, 0, 5][:R]),
        top_p=torch.tensor([0.9, 1.0, 0.8][:R]),
        draft_token_probs=None,
        draft_logits=None,
        draft_temperature=None,
    )


def _op_args(name):
    """The positional arguments of torch.ops.dspark.<name> from the op module's example()."""
    module = importlib.import_module(f"dspark_kernels.ops.{name}")
    return tuple(module.OP.record(**module.example())) + ("",)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema, fake and kernel agree (torch.library.opcheck) for every registered op."""
    torch.library.opcheck(getattr(torch.ops.dspark, name).default, _op_args(name))


def test_every_public_op_is_a_dspark_torch_op():
    assert len(OPS) >= 6 and len(set(OPS)) == len(OPS)
    for name in OPS:
        assert hasattr(torch.ops.dspark, name), name
        assert callable(getattr(dk, name)), name
        assert name in dk.__all__, name


def test_compile_fullgraph_markov_draft():
    args = _markov_args()
    eager = dk.markov_draft(**args)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(**kw):
        return dk.markov_draft(**kw)

    compiled = f(**args)
    for a, b in zip(eager, compiled):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_compile_fullgraph_rejection_sample_and_rng():
    args = _rejection_args()
    eager = dk.rejection_sample(**args)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(kw, seed, offset):
        tokens, n = dk.rejection_sample(**kw)
        u = dk.philox_uniform(seed, offset, stream=2, n=5)
        return tokens, n, u

    tokens, n, u = f(args, args["seed"], args["offset"])
    assert torch.equal(tokens, eager[0]) and torch.equal(n, eager[1])
    assert torch.equal(u, dk.philox_uniform(args["seed"], args["offset"], stream=2, n=5))


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.philox_uniform(torch.tensor([1]), torch.tensor(0), stream=1, n=4, backend="fast")


def test_cuda_backend_on_cpu_names_the_problem():
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        dk.philox_uniform(torch.tensor([1]), torch.tensor(0), stream=1, n=4, backend="cuda")


def test_missing_kernel_names_the_op():
    from dspark_kernels._backend import Implementations
    from dspark_kernels.ops import pack_verify as pv_op

    assert pv_op.IMPLS.cuda is None
    args = (torch.tensor([1]), torch.tensor([[2]]), torch.tensor([1]), torch.tensor([0, 2], dtype=torch.int32),
            torch.tensor([0]))
    with pytest.raises(BackendUnavailableError, match="pack_verify has no CUDA"):
        dk.pack_verify(*args, backend="cuda")
    # An op without a Triton kernel (pack_verify has one now), as the registry would hold it.
    bare = Implementations("bare_op", reference=lambda a: None)
    with pytest.raises(BackendUnavailableError, match="bare_op has no Triton implementation"):
        bare.resolve("triton", "cpu")


def test_triton_on_cpu_requires_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in pu_op.IMPLS.available("cpu")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        pu_op.IMPLS.resolve("triton", "cpu")


def test_auto_never_picks_missing_backends():
    # auto = the first of cuda, triton, reference that is present; reference only on CPU.
    for mod in (md_op, rs_op, pu_op):
        assert mod.IMPLS.resolve("auto", "cpu") == "reference"
        present = [b for b in mod.IMPLS.available("cuda") if b not in mod.IMPLS.not_auto]
        expected = next(b for b in ("cuda", "triton", "reference") if b in present)
        assert mod.IMPLS.resolve("auto", "cuda") == expected


def test_auto_skips_backends_not_yet_verified_on_gpu():
    from dspark_kernels._backend import Implementations

    fake = Implementations(name="fake", reference=lambda: "ref", triton="m:f", not_auto=("triton",))
    assert fake.resolve("auto", "cuda") == "reference"
    assert "triton" in fake.available("cuda")  # still callable explicitly
    assert fake.resolve("triton", "cuda") == "triton"
    # Compile-only CUDA kernels are never auto-picked until a GPU run verifies them.
    for mod in (md_op, rs_op, pu_op):
        assert "cuda" in mod.IMPLS.not_auto and mod.IMPLS.resolve("auto", "cuda") != "cuda"
    if dk._backend.cuda_extension() is None:
        assert pu_op.IMPLS.resolve("auto", "cuda") != "cuda"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("DSPARK_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        dk.philox_uniform(torch.tensor([1]), torch.tensor(0), stream=1, n=4)
    # the keyword wins over the environment
    out = dk.philox_uniform(torch.tensor([1]), torch.tensor(0), stream=1, n=4, backend="reference")
    assert out.shape == (1, 4)
    monkeypatch.setenv("DSPARK_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.philox_uniform(torch.tensor([1]), torch.tensor(0), stream=1, n=4)


def test_extension_absence_is_explained():
    from dspark_kernels import _extension

    if dk._backend.cuda_extension() is None:
        assert _extension.why_missing() != "loaded"
        assert "cuda" not in pu_op.IMPLS.available("cuda")
    else:
        assert "cuda" in pu_op.IMPLS.available("cuda")


def test_debug_switch_round_trip():
    before = dk.debug_enabled()
    try:
        dk.set_debug(True)
        assert dk.debug_enabled()
        dk.set_debug(False)
        assert not dk.debug_enabled()
    finally:
        dk.set_debug(before)


@pytest.mark.parametrize("call", [
    lambda: dk.philox_uniform([1, 2], torch.tensor(0), stream=1, n=4),
    lambda: dk.schedule_verify([[0.5]], torch.ones(3)),
    lambda: dk.pack_verify([0], torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                           torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)),
    lambda: dk.rejection_sample(**dict(_rejection_args(), temperature=[1.0, 0.0, 0.7])),
    lambda: dk.markov_draft(**{**_markov_args(), "seed": [0]}),
], ids=["philox_uniform", "schedule_verify", "pack_verify", "rejection_sample", "markov_draft"])
def test_non_tensor_argument_is_a_type_error_naming_it(call):
    with pytest.raises(TypeError, match=r"(seed|survival|anchor|temperature) must be a torch.Tensor"):
        call()
