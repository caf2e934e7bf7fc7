"""CapacityPipe (dspark_kernels/engine/capacity.py): K of `lag` pushes ago on the host, without blocking.

CPU: the ring's values (initial, then the value pushed lag earlier, for several lags and many
pushes), that peek never waits when the copy's event is complete and waits exactly once (a
counted stall, the right value) when it is not (fake events), and bad arguments. GPU (marker
gpu): in a steady loop whose host work outlasts the device work, no event or device
synchronisation at all; and a copy still in flight is waited for, never read stale.
"""

from __future__ import annotations

import time

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.engine.capacity import CapacityPipe


def k_of(v, dtype=torch.int32, device="cpu"):
    return torch.tensor(v, dtype=dtype, device=device)


@pytest.mark.parametrize("lag", [1, 2, 3, 5])
def test_peek_returns_the_push_lag_earlier(lag):
    pipe = CapacityPipe(lag=lag, initial=17)
    assert pipe.peek() == 17 and pipe.pushes == 0
    values = [3 * i + 1 for i in range(40)]
    for n, v in enumerate(values, start=1):
        pipe.push(k_of(v))
        assert pipe.pushes == n
        assert pipe.peek() == (values[n - lag] if n >= lag else 17), (lag, n)
        assert pipe.peek() == pipe.peek()  # peek does not consume
    assert pipe.stalls == 0


def test_lag_two_as_the_engine_uses_it():
    """Round t admits K of round t - 2: before rounds 0 and 1 the initial value, then K_{t-2}."""
    pipe = CapacityPipe(lag=2, initial=64)
    seen = []
    for t, k in enumerate([10, 20, 30, 40]):
        seen.append(pipe.peek())  # the host picks round t's bucket from this
        pipe.push(k_of(k))
    assert seen == [64, 64, 10, 20]


def test_exported_and_accepts_int64():
    assert dk.CapacityPipe is CapacityPipe and "CapacityPipe" in dk.__all__
    pipe = CapacityPipe(lag=1, initial=0, device="cpu")
    pipe.push(k_of(2**20, torch.int64))
    pipe.push(k_of([7]))  # a one-element 1-d tensor is fine too
    assert pipe.peek() == 7


class FakeEvent:
    def __init__(self, done: bool):
        self.done = done
        self.queries = 0
        self.synchronizes = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def synchronize(self) -> None:
        self.synchronizes += 1
        self.done = True


class FakeCudaPipe(CapacityPipe):
    """The CUDA path's bookkeeping on CPU tensors: every push records a fake event."""

    def __init__(self, *args, done=True, **kw):
        super().__init__(*args, **kw)
        self.done = done
        self.fakes = []

    def _record(self, k, slot):
        event = FakeEvent(self.done)
        self.fakes.append(event)
        return event


def test_never_blocks_when_the_copy_is_complete():
    pipe = FakeCudaPipe(lag=2, initial=5, done=True)
    for v in range(1, 30):
        pipe.push(k_of(v))
        assert pipe.peek() == (v - 1 if v >= 2 else 5)
    assert pipe.stalls == 0
    assert sum(e.synchronizes for e in pipe.fakes) == 0
    assert sum(e.queries for e in pipe.fakes) > 0  # it did ask, without waiting


def test_waits_for_an_incomplete_copy_and_counts_it():
    pipe = FakeCudaPipe(lag=2, initial=5, done=False)
    pipe.push(k_of(11))
    pipe.push(k_of(12))
    assert pipe.peek() == 11  # the right value, after waiting
    assert pipe.stalls == 1 and pipe.fakes[0].synchronizes == 1
    assert pipe.peek() == 11 and pipe.stalls == 1  # that copy is known complete now
    assert pipe.fakes[1].synchronizes == 0  # only the slot read is waited for


@pytest.mark.parametrize("kw,exc,match", [
    (dict(lag=0), ValueError, "lag"), (dict(lag=1.5), ValueError, "lag"), (dict(lag=True), ValueError, "lag"),
    (dict(initial=-1), ValueError, "initial"), (dict(initial=2.0), ValueError, "initial"),
])
def test_bad_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        CapacityPipe(**kw)


@pytest.mark.parametrize("k,exc,match", [
    (3, TypeError, "k must be a torch.Tensor"), (torch.zeros(2, dtype=torch.int32), ValueError, "one-element"),
    (torch.tensor(1.0), TypeError, "int32 or int64"),
])
def test_bad_push(k, exc, match):
    with pytest.raises(exc, match=match):
        CapacityPipe().push(k)


@pytest.mark.gpu
def test_cuda_steady_state_never_synchronizes(monkeypatch):
    """A loop like the engine's: device work makes K, push, host work longer than the device's,
    peek. No Event.synchronize, no torch.cuda.synchronize inside the pipe, right values."""
    calls = []
    real_event_sync, real_sync = torch.cuda.Event.synchronize, torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: calls.append("event") or real_event_sync(self))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("device") or real_sync(*a))
    pipe = CapacityPipe(lag=2, initial=9, device="cuda")
    assert pipe._host.is_pinned()
    g = torch.Generator(device="cuda").manual_seed(0)
    hist = torch.cumprod(0.5 + 0.5 * torch.rand(64, 7, device="cuda", generator=g), 1)
    sps = 1.0 / (1.0 + 0.01 * torch.arange(64 * 8 + 1, device="cuda", dtype=torch.float32))
    pushed, seen = [], []
    for step in range(30):
        seen.append(pipe.peek())
        k = dk.verify_capacity(hist * (0.5 + step / 60), sps)
        pushed.append(k.clone())
        pipe.push(k)
        time.sleep(0.002)  # the host's own work for the step (a few ms in an engine)
    assert calls == [] and pipe.stalls == 0, (calls, pipe.stalls)
    want = [9, 9] + [int(k) for k in pushed[:-2]]
    assert seen == want


@pytest.mark.gpu
def test_cuda_copy_in_flight_is_waited_for():
    pipe = CapacityPipe(lag=1, initial=0, device="cuda")
    k = torch.zeros((), dtype=torch.int32, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device time before K is written
    k.fill_(123)
    pipe.push(k)
    assert pipe.peek() == 123  # not the slot's old 0
    assert pipe.stalls == 1
