"""Benchmarks: each module has ``main(argv) -> int`` and writes CSV (and PNG) files.

Run them as ``mlx-localnorm bench <name>``. Shared timing and output helpers live in
:mod:`mlx_localnorm.bench.common`.
"""
