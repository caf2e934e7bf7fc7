"""CapacityPipe: the async scheduler's capacity K, copied to the host without blocking.

DSpark's zero-overhead scheduling (paper §5.2) admits in step t the K that
verify_capacity computed from the survival of step t - 2. K decides the
verify batch size (at most A + K tokens), and the host must know that size
before it launches step t, to replay the CUDA graph captured for its bucket.
Reading K with ``int(k)`` right after computing it would stall the host
until the device catches up, every step. Instead each step pushes its K into
a small ring of pinned host memory with a non-blocking device-to-host copy
on the current stream, followed by a CUDA event; ``lag`` steps later the host
reads it. By then the device has normally finished that copy long ago (it
sits right after step t - lag's kernels), so ``peek`` finds the event complete
and reads the pinned slot: no synchronisation at all.

Correctness comes first: if the copy is not complete yet (the host ran more
than ``lag`` steps ahead of the device), ``peek`` waits on that one event,
counts it in ``stalls``, and returns the right K; it never returns a stale or
a guessed value. A steady engine keeps ``stalls`` at 0; a growing count says
the host outruns the device by more than ``lag`` steps (raise lag, or the
device is the bottleneck anyway).

On CPU tensors push is a plain copy and peek never waits.
"""

from __future__ import annotations

import torch

ENGINE_EXPORTS = ("CapacityPipe",)


class CapacityPipe:
    """A ring of lag + 1 pinned host slots that delays the device's K by ``lag`` pushes.

    pipe = CapacityPipe(lag=2, initial=K0, device=None)
    pipe.push(k)      k: [] int32 (or int64) device tensor of this step; copied to the host
                      without blocking (non-blocking copy on the current stream, then an event).
                      Call it outside CUDA-graph capture, after the work that writes k is queued.
    pipe.peek() -> int  the K pushed ``lag`` pushes before now (initial while fewer than lag
                      pushes happened), without blocking when its copy is complete (the normal
                      case); otherwise it waits for that copy and counts a stall.
    pipe.pushes, pipe.stalls: counters.

    lag + 1 slots suffice: the slot peek reads (push n - lag, after n pushes) is
    overwritten only by push n + 1, which the host issues after that read.
    device: where the K tensors live (host memory is pinned for CUDA); None:
    taken from the first push.
    """

    def __init__(self, lag: int = 2, initial: int = 0, device=None):
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
            raise ValueError(f"lag must be an int >= 1, got {lag!r}")
        if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
            raise ValueError(f"initial must be an int >= 0 (a number of drafts), got {initial!r}")
        self.lag = lag
        self.initial = initial
        self.pushes = 0
        self.stalls = 0
        self._slots = lag + 1
        self._host = None  # [lag + 1] int32, pinned when the device is CUDA
        self._events = [None] * self._slots
        self.device = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host = torch.zeros(self._slots, dtype=torch.int32, pin_memory=pinned)
        self._view = self._host.numpy()  # host reads without going through torch's dispatcher
        self.device = device

    def _record(self, k: torch.Tensor, slot: int):
        """The slot's event, recorded after the copy just queued on k's current stream (None on CPU:
        nothing to wait for). One event per slot, re-recorded: no event is created per step."""
        if k.device.type != "cuda":
            return None
        event = self._events[slot] if self._events[slot] is not None else torch.cuda.Event()
        event.record(torch.cuda.current_stream(k.device))
        return event

    def push(self, k: torch.Tensor) -> None:
        """Queue the copy of this step's K (a one-element int32 / int64 tensor) to the host."""
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
        if k.numel() != 1 or k.dim() > 1:
            raise ValueError(f"k must be a 0-d (or one-element) tensor, got shape {tuple(k.shape)}")
        if k.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"k must have dtype int32 or int64, got {k.dtype}")
        if self._host is None:
            self._allocate(k.device)
        elif k.device.type != self.device.type:
            raise ValueError(f"k is on {k.device} but the pipe was made for {self.device}")
        slot = self.pushes % self._slots
        src = k.reshape(())
        if src.dtype != torch.int32:
            src = src.to(torch.int32)  # on the device, queued like the copy: no sync
        self._host[slot].copy_(src, non_blocking=k.device.type == "cuda")
        self._events[slot] = self._record(k, slot)
        self.pushes += 1

    def peek(self) -> int:
        """K of push number pushes - lag (initial before that), on the host, normally without waiting."""
        if self.pushes < self.lag:
            return self.initial
        slot = (self.pushes - self.lag) % self._slots
        event = self._events[slot]
        if event is not None and not event.query():
            # The host is more than lag pushes ahead of the device: wait for this copy
            # (correct K first), and count it.
            self.stalls += 1
            event.synchronize()
        return int(self._view[slot])

    def __repr__(self) -> str:
        return (f"CapacityPipe(lag={self.lag}, initial={self.initial}, device={self.device}, "
                f"pushes={self.pushes}, stalls={self.stalls})")
