"""SPS profiling: isotonic cleaning, deterministic timing through a fake clock, plots."""

import sys
import time

import pytest
import torch

from dspark_kernels.engine.sps_table import SPSProfile, isotonic_increasing, plot_sps, profile_sps, sps_from_seconds

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """A clock that only moves when the fake step says so: timings are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeStep:
    """step(B) advances the clock by seconds(B, call index of this B); records every call."""

    def __init__(self, clock, seconds):
        self.clock = clock
        self.seconds = seconds
        self.calls = []

    def __call__(self, batch_tokens):
        index = sum(1 for b in self.calls if b == batch_tokens)
        self.calls.append(batch_tokens)
        self.clock.now += self.seconds(batch_tokens, index)


def brute_force_isotonic(values):
    """ŷ_i = max_{j<=i} min_{k>=i} mean(y_j..y_k), the closed form of unweighted isotonic regression."""
    n = len(values)
    out = []
    for i in range(n):
        out.append(max(min(sum(values[j:k + 1]) / (k + 1 - j) for k in range(i, n)) for j in range(i + 1)))
    return out


def test_isotonic_hand_examples():
    assert isotonic_increasing([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert isotonic_increasing([3.0, 2.0, 1.0]).tolist() == [2.0, 2.0, 2.0]
    assert isotonic_increasing([1.0, 2.0, 2.0, 5.0]).tolist() == [1.0, 2.0, 2.0, 5.0]
    # A later violator pools with an already pooled block: [4, 2] → 3, then 1 → mean(4, 2, 1).
    assert isotonic_increasing([0.0, 4.0, 2.0, 1.0, 9.0]).tolist() == pytest.approx([0.0, 7 / 3, 7 / 3, 7 / 3, 9.0])
    # Weighted: the pooled value is the weighted mean (3·1 + 2·3) / 4.
    assert isotonic_increasing([1.0, 3.0, 2.0], weights=[1.0, 1.0, 3.0]).tolist() == pytest.approx([1.0, 2.25, 2.25])
    assert isotonic_increasing(torch.tensor([5.0])).tolist() == [5.0]


def test_isotonic_matches_closed_form_on_random_input():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        values = torch.randn(9, generator=g, dtype=torch.float64).tolist()
        got = isotonic_increasing(values)
        assert got.dtype == torch.float64
        assert bool((got[1:] >= got[:-1]).all())
        assert got.tolist() == pytest.approx(brute_force_isotonic(values), abs=1e-12)
        assert float(got.sum()) == pytest.approx(sum(values), abs=1e-12)


def test_isotonic_rejects_bad_input():
    with pytest.raises(ValueError):
        isotonic_increasing([1.0, float("nan")])
    with pytest.raises(ValueError):
        isotonic_increasing([1.0, 2.0], weights=[1.0, 0.0])
    with pytest.raises(ValueError):
        isotonic_increasing([1.0, 2.0], weights=[1.0])


def test_sps_from_seconds():
    sps = sps_from_seconds(torch.tensor([float("nan"), 0.5, 0.25]))
    assert sps.dtype == torch.float32
    assert sps.tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        sps_from_seconds(torch.tensor([0.0, 0.0]))


def test_profile_with_fake_clock_takes_medians_after_warmup_and_cleans():
    clock = FakeClock()
    # Step time 1 ms + 0.1 ms·B, except B = 3 runs "faster" than B = 2 (noise
    # the cleaning must remove); warm-up calls and one timed repeat per B are
    # slow outliers that the warm-up skip and the median must ignore.
    base = {1: 1.1e-3, 2: 1.2e-3, 3: 1.0e-3, 4: 1.4e-3, 5: 1.5e-3}

    def seconds(b, index):
        if index < 2:
            return 1.0
        if index == 3:
            return 0.5
        return base[b] + 1e-6 * (index % 2)

    step = FakeStep(clock, seconds)
    prof = profile_sps(step, 5, device="cpu", warmup=2, repeats=5, timer=clock)
    assert isinstance(prof, SPSProfile)
    assert step.calls == [b for b in range(1, 6) for _ in range(7)]
    assert prof.batch_sizes.tolist() == [1, 2, 3, 4, 5]
    assert prof.samples.shape == (5, 5)
    # Timed repeats are call indices 2..6: base+0, outlier, base+0, base+1e-6, base+0 → median base.
    torch.testing.assert_close(prof.raw_seconds, torch.tensor([base[b] for b in range(1, 6)], dtype=torch.float64))
    cleaned = torch.tensor([1.1e-3, 1.1e-3, 1.1e-3, 1.4e-3, 1.5e-3], dtype=torch.float64)
    torch.testing.assert_close(prof.cleaned_seconds, cleaned)

    assert prof.sps.dtype == torch.float32 and prof.sps.shape == (6,)
    assert prof.sps[0] == 0.0 and prof.raw_sps[0] == 0.0
    assert bool((prof.sps[2:] <= prof.sps[1:-1]).all())
    assert not bool((prof.raw_sps[2:] <= prof.raw_sps[1:-1]).all())
    torch.testing.assert_close(prof.sps[1:], (1.0 / prof.cleaned_seconds).float())
    torch.testing.assert_close(prof.raw_sps[1:], (1.0 / prof.raw_seconds).float())
    assert torch.isnan(prof.seconds[0])
    assert prof.max_batch == 5


def test_profile_subsampled_batch_sizes_interpolate_step_time():
    clock = FakeClock()
    step = FakeStep(clock, lambda b, index: 2e-3 + 5e-5 * b * b)
    prof = profile_sps(step, 10, warmup=1, repeats=3, batch_sizes=[4, 7], timer=clock)
    # 1 and Bmax are always measured so every B in between is interpolated.
    assert prof.batch_sizes.tolist() == [1, 4, 7, 10]
    assert sorted(set(step.calls)) == [1, 4, 7, 10]
    assert len(step.calls) == 4 * (1 + 3)
    measured = {b: 2e-3 + 5e-5 * b * b for b in (1, 4, 7, 10)}
    expected = [float("nan")]
    for b in range(1, 11):
        lo = max(x for x in measured if x <= b)
        hi = min(x for x in measured if x >= b)
        frac = 0.0 if hi == lo else (b - lo) / (hi - lo)
        expected.append(measured[lo] + frac * (measured[hi] - measured[lo]))
    torch.testing.assert_close(prof.seconds, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert prof.sps.shape == (11,)
    assert bool((prof.sps[2:] <= prof.sps[1:-1]).all())


def test_profile_with_host_clock_busy_wait():
    def step(b):
        end = time.perf_counter() + 2e-4 * b
        while time.perf_counter() < end:
            pass

    prof = profile_sps(step, 4, device="cpu", warmup=1, repeats=3)
    assert prof.sps.shape == (5,) and prof.sps[0] == 0.0
    assert bool((prof.sps[2:] <= prof.sps[1:-1]).all())
    # A busy wait lasts at least its target; the cleaned time never undercuts the smallest.
    assert bool((prof.raw_seconds >= 2e-4 * prof.batch_sizes.double()).all())
    assert float(prof.seconds[4]) >= 8e-4


@pytest.mark.gpu  # CUDA events
def test_profile_with_cuda_events():
    x = torch.randn(4096, 1024, device="cuda")
    w = torch.randn(1024, 1024, device="cuda")

    def step(b):
        y = x[: 256 * b]
        for _ in range(20):
            y = y @ w

    prof = profile_sps(step, 8, device="cuda", warmup=2, repeats=5)
    assert prof.sps.shape == (9,) and prof.sps[0] == 0.0
    assert bool((prof.raw_seconds > 0).all())
    assert bool((prof.sps[2:] <= prof.sps[1:-1]).all())
    assert float(prof.raw_seconds[-1]) > float(prof.raw_seconds[0])


def test_profile_rejects_bad_arguments():
    clock = FakeClock()
    step = FakeStep(clock, lambda b, index: 1e-3)
    with pytest.raises(ValueError):
        profile_sps(step, 0, timer=clock)
    with pytest.raises(ValueError):
        profile_sps(step, 4, repeats=0, timer=clock)
    with pytest.raises(ValueError):
        profile_sps(step, 4, warmup=-1, timer=clock)
    with pytest.raises(ValueError):
        profile_sps(step, 4, batch_sizes=[0, 2], timer=clock)
    with pytest.raises(ValueError):
        profile_sps(step, 4, batch_sizes=[5], timer=clock)
    with pytest.raises(ValueError):
        profile_sps(step, 4, batch_sizes=[2.5], timer=clock)
    frozen = FakeClock()
    with pytest.raises(ValueError, match="finite and > 0"):
        profile_sps(lambda b: None, 3, device="cpu", timer=frozen)


def _profile_for_plot():
    clock = FakeClock()
    wobble = [0.0, 3e-4, -2e-4, 1e-4]
    step = FakeStep(clock, lambda b, index: 1e-3 + 4e-5 * b + wobble[b % 4])
    return profile_sps(step, 32, warmup=0, repeats=3, batch_sizes=range(1, 33, 3), timer=clock)


def test_plot_sps_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    prof = _profile_for_plot()
    out = plot_sps(prof, tmp_path / "sps.png")
    assert out == tmp_path / "sps.png"
    data = (tmp_path / "sps.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    with pytest.raises(TypeError):
        plot_sps(prof.sps, tmp_path / "bad.png")


def test_plot_sps_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    prof = _profile_for_plot()
    # A None entry in sys.modules makes that import fail, as if not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_sps(prof, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
