"""Constants of the sampling contract, in one place for every backend.

The reference (dspark_kernels.rng, reference/sampling.py) and the Triton
kernels import these; the CUDA headers (csrc/philox.cuh, csrc/sampling.cuh)
spell them in C++ and tests/test_constants.py checks that they agree. Their
values are part of the contract of the bits: changing one changes every
sampled token.
"""

# Philox-4x32-10 (Salmon et al., SC'11): round multipliers and Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# A uniform is (2 (x >> 9) + 1) * 2**-24 for the 32-bit lane x: 2**23 values
# strictly inside (0, 1), symmetric and exact in fp32, so -log(u) is finite.
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0**-24

# Stream ids: one per kind of draw; streams never share counters (sharing them
# correlated acceptance coins with residual draws: vllm PRs #47386, #54282).
STREAM_DRAFT = 1  # markov_draft: token x_k at step k, one uniform per vocab id
STREAM_ACCEPT = 2  # rejection_sample: acceptance coin of draft j (index 0)
STREAM_RESIDUAL = 3  # rejection_sample: residual sample at the first rejection j
STREAM_BONUS = 4  # rejection_sample: bonus token after all l drafts accepted
STREAM_TREE_ACCEPT = 5  # reserved for tree_rejection_sample
STREAM_TREE_RESIDUAL = 6  # reserved for tree_rejection_sample

# Counter field widths: position and stream share 32 bits, the index // 4 fills 32 bits.
MAX_POSITION = 1 << 16
MAX_STREAM = 1 << 16
MAX_INDEX = 1 << 34
MAX_ROWS = 1 << 16  # requests per philox_uniform call (one grid row each)

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS convention). Below
# about 1e-30 the division z / T overflows fp32 to inf and ties every lane; at
# 1e-5 a softmax is already one-hot in fp32 unless two logits agree to within
# 1e-5 * 88 ~ 1e-3, so treating the whole range as greedy costs nothing real.
GREEDY_TEMPERATURE = 1e-5

# One thread block (CUDA) or one program (Triton) sorts every candidate of
# schedule_verify: at most this many R·γ (csrc/schedule_verify.h says why).
SCHEDULE_MAX_CANDIDATES = 16384
