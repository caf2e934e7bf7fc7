"""The op registry: one line per op. Everything that lists ops reads OPS.

Each name is a module dspark_kernels.ops.<name> that defines the op
(torch.ops.dspark.<name>) and its public function of the same name.
"""

OPS = (
    "markov_draft",
    "schedule_verify",
    "verify_capacity",
    "pack_verify",
    "append_verify_kv",
    "verify_attention",
    "rejection_sample",
    "tree_rejection_sample",
    "tree_verify_layout",
    "compact_accepted_kv",
    "advance",
    "philox_uniform",
)
