"""Benchmarks of lightning_gradguard (not part of the installed package).

``python -m benchmarks.overhead`` from the repository root; see ``benchmarks/README.md``.
"""
