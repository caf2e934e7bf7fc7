"""Triton kernels. Importing this package imports triton; callers guard it.

Set TRITON_INTERPRET=1 before the first import of triton to run these kernels
on CPU tensors (small shapes only; fp32 math).
"""
