"""Benchmarks for resnet_transfer: ``python -m benchmarks [name ...] [--quick | --full]``.

One module per figure (``bench_<name>.py``), each exposing ``main(argv: list[str] | None = None) -> dict``
and printing one JSON line plus a human summary. See docs/performance.md for the latest figures.
"""
