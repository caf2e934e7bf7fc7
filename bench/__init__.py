"""Benchmarks for dspark_kernels: a shared harness and one script per op.

Run a script as a module from the repository root, for example
``python -m bench.bench_markov_draft --out bench/out/markov.json``.
"""
