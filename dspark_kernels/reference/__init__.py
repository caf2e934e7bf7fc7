"""Plain-PyTorch reference implementations: fp32 math, any device.

These define what every op computes; the Triton and CUDA kernels must return
the same tokens for the same seeds and offsets.
"""
