"""Benchmarks, probes, studies and report generators (issue #26).

Everything here sits on top of the runtime packages' public API: bench may import training, export and serving;
nothing in training, export or serving imports bench. Run a benchmark as ``python -m bench.<name>``.
"""
