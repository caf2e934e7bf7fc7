"""HostSyncSpy: a CPU stand-in for CUDA-graph capture checks.

Inside ``with HostSyncSpy() as spy``, every aten op that reads a tensor's
values back to the host (and would therefore sync a CUDA stream and break
graph capture) is recorded in ``spy.syncs``. Tests assert the list is empty
for the code paths that must be capturable.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(t), int(t), t[0-d index tensor]
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}


class HostSyncSpy(TorchDispatchMode):
    """Records the aten ops that read device values back to the host."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.ops: list[str] = []  # every op dispatched, in order (for "no torch op here" checks)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))
