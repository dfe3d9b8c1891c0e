"""Serving: spec -> model_repository/ -> tritonserver -> clients.

Benchmarks of the served models live in the top-level ``bench`` package (``bench.served``, ...).

Modules (heavy imports are lazy, so ``import serving`` stays light):
- ``serving.repository``: config.pbtxt generation (cpu/gpu targets) + validation with Triton's protobuf.
- ``serving.modelconfig``: the config building blocks, text in and out, the checks every config passes, atomic writes.
- ``serving.cli``: ``attnzoo``, the one command line over every stage's ``python -m`` main; ``cli_error``.
- ``serving.backend/model.py``: the one generic python-backend model (onnxruntime inside).
- ``serving.server``: start/stop/ready of the real tritonserver, as CLI and context manager.
- ``serving.client``: tritonclient wrapper and CLI.
"""
