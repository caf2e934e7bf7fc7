"""The shared RNG: known-answer vectors, identical bits on every backend
(the CUDA header is checked on the host through nvcc), stream/offset/seed
independence, and uniformity. Argument validation: tests/test_validation.py."""

import shutil
import subprocess

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import rng
from dspark_kernels.ops import philox_uniform as op

from support import DEVICE, available_backends


def _t(x):
    return torch.tensor([x], dtype=torch.int64)


@pytest.mark.parametrize(
    "ctr,key,expected",
    [
        # Random123 known-answer vectors for philox4x32_10.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32(*(_t(c) for c in ctr), *(_t(k) for k in key))
    assert tuple(int(o) for o in out) == expected


SEEDS = torch.tensor([0, 1, 7, 2**40 + 3, -1, 2**63 - 1], dtype=torch.int64)


@pytest.mark.parametrize("backend", available_backends(op))
@pytest.mark.parametrize("n", [1, 3, 4, 1037])
def test_backends_bit_identical(backend, n):
    seed = SEEDS.to(DEVICE)
    offset = torch.tensor(2**33 + 5, dtype=torch.int64, device=DEVICE)
    ref = dk.philox_uniform(seed.cpu(), offset.cpu(), stream=rng.STREAM_RESIDUAL, position=6, n=n, backend="reference")
    out = dk.philox_uniform(seed, offset, stream=rng.STREAM_RESIDUAL, position=6, n=n, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (len(SEEDS), n)
    assert torch.equal(out.cpu(), ref)


def test_triton_matches_reference_under_interpreter():
    """The Triton RNG is checked on CPU in CI, not only where a GPU exists."""
    pytest.importorskip("triton")
    if DEVICE == "cpu" and "triton" not in available_backends(op):
        pytest.fail("TRITON_INTERPRET should be set by conftest so Triton runs on CPU")
    seed = SEEDS.to(DEVICE)
    offset = torch.tensor(11, dtype=torch.int64, device=DEVICE)
    a = dk.philox_uniform(seed, offset, stream=rng.STREAM_DRAFT, position=65535, n=257, backend="triton")
    b = dk.philox_uniform(seed.cpu(), offset.cpu(), stream=rng.STREAM_DRAFT, position=65535, n=257, backend="reference")
    assert torch.equal(a.cpu(), b)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_header_bits_match_reference(tmp_path):
    """csrc/philox.cuh is __host__ __device__: run it on the host (csrc/tests/host_math_philox.cu) and compare bits."""
    from test_cuda_host_math import build_host_program  # the one host-program builder

    exe = build_host_program(tmp_path, "host_math_philox")
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(200):
        seed = int(torch.randint(-(2**62), 2**62, (1,), generator=g))
        offset = int(torch.randint(0, 2**62, (1,), generator=g))
        stream = int(torch.randint(1, 7, (1,), generator=g))
        position = int(torch.randint(0, 2**16, (1,), generator=g))
        index = int(torch.randint(0, 2**33, (1,), generator=g))
        cases.append((seed, offset, stream, position, index))
    stdin = "\n".join(" ".join(str(v) for v in c) for c in cases) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    host = torch.tensor([float(v) for v in out], dtype=torch.float32)
    ref = torch.stack(
        [rng.uniform(_t(s), torch.tensor(o), st, p, i)[0] for s, o, st, p, i in cases]
    )
    assert torch.equal(host, ref)


def test_uniform_range_and_moments():
    u = dk.philox_uniform(torch.arange(64, dtype=torch.int64), torch.tensor(0), stream=1, n=4096, backend="reference")
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    n = u.numel()
    # mean 1/2 and variance 1/12 within 6 standard errors
    assert abs(float(u.mean()) - 0.5) < 6 * (1 / 12) ** 0.5 / n**0.5
    assert abs(float(u.var()) - 1 / 12) < 6 * (1 / 180) ** 0.5 / n**0.5
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = n / 16
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    p = float(torch.special.gammaincc(torch.tensor(15 / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p > 1e-4


def test_streams_offsets_seeds_positions_are_independent():
    base = dict(stream=1, position=0, n=512)
    seed = torch.tensor([5], dtype=torch.int64)
    ref = dk.philox_uniform(seed, torch.tensor(0), **base)
    variants = [
        dk.philox_uniform(seed, torch.tensor(1), **base),
        dk.philox_uniform(seed, torch.tensor(2**32), **base),
        dk.philox_uniform(seed + 1, torch.tensor(0), **base),
        dk.philox_uniform(seed + 2**32, torch.tensor(0), **base),
        dk.philox_uniform(seed, torch.tensor(0), **{**base, "stream": 2}),
        dk.philox_uniform(seed, torch.tensor(0), **{**base, "position": 1}),
    ]
    for v in variants:
        assert not torch.equal(v, ref)
        # unrelated draws: correlation near 0 (512 pairs -> |r| < 6/sqrt(512))
        r = torch.corrcoef(torch.stack([v[0], ref[0]]))[0, 1]
        assert abs(float(r)) < 6 / 512**0.5
    again = dk.philox_uniform(seed, torch.tensor(0), **base)
    assert torch.equal(again, ref)


def test_batch_invariance():
    seeds = torch.tensor([3, 9, 27], dtype=torch.int64)
    batch = dk.philox_uniform(seeds, torch.tensor(4), stream=3, n=10)
    for i in range(3):
        alone = dk.philox_uniform(seeds[i : i + 1], torch.tensor(4), stream=3, n=10)
        assert torch.equal(alone[0], batch[i])
