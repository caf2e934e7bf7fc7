"""dspark_kernels: GPU kernels for DSpark-style speculative decoding.

Every op is a torch op in the ``dspark`` namespace (torch.ops.dspark.<name>)
with a fake implementation for torch.compile and CUDA graphs; the functions
here are the stable Python API (see shared DESIGN.md). Choose the
implementation with ``backend=`` or DSPARK_BACKEND: "auto", "reference",
"triton", "cuda".
"""

from ._backend import BACKENDS, BackendUnavailableError
from ._validate import debug_enabled, set_debug
from .ops.markov_draft import MarkovDraft, markov_draft
from .ops.pack_verify import VerifyBatch, pack_verify
from .ops.philox_uniform import philox_uniform
from .ops.rejection_sample import rejection_sample
from .ops.schedule_verify import Schedule, schedule_verify
from .ops.verify_attention import verify_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MarkovDraft",
    "Schedule",
    "VerifyBatch",
    "debug_enabled",
    "markov_draft",
    "pack_verify",
    "philox_uniform",
    "rejection_sample",
    "schedule_verify",
    "set_debug",
    "verify_attention",
]
