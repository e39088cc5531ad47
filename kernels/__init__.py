"""Triton kernels, installed as `erpd.kernels` (one module per op).

Importing a module here defines `@triton.jit` functions, so `TRITON_INTERPRET=1` must be set
before the first import when running them on CPU.
"""
