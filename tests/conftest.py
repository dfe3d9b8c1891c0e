"""Shared fixtures. Trained weights are shipped (training/weights/); exported graphs come from `make export`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The zoo's tests see the zoo only: models a user derived for their own images (user_models/) stay out of
# every "all models" loop; the user-image tests write theirs to their own folders.
os.environ["ATTNZOO_USER_MODELS"] = tempfile.mkdtemp(prefix="attnzoo-user-models-")


def require_checkpoint(name: str) -> None:
    """Weights are tracked, so a missing checkpoint is a failure, never a skip."""
    from training import checkpoint_path

    if not checkpoint_path(name).exists():
        pytest.fail(f"no shipped checkpoint for {name!r} ({checkpoint_path(name)}); run `python -m training {name}`")


def require_onnx(triton_model: str):
    from training.layout import onnx_path

    p = onnx_path(triton_model)
    if not p.exists():
        pytest.skip(f"no exported graph for {triton_model!r} ({p}); run `make export` first")
    return p


def pytest_report_header(config: pytest.Config) -> str:
    """Which kernels this run tests: results that depend on the instruction set differ between hosts."""
    from training.fingerprint import isa_summary

    return f"numerics host: {isa_summary()}"


# ------------------------------------------------------------------ long work started when the session starts
# The suite's longest fixtures are training runs in subprocesses (the cheapest model retrained from scratch,
# the user-image trees trained and exported, the feedback sweep). A module that defines ``start_early()`` has it
# called once its tests are collected; it hands such work to ``early()``, which runs it in one background thread,
# at lower priority (``early_process``), on the share of the 2 cores the serial tests leave idle (they use about
# 1.2 on average). The module's fixture then waits for the result. Measured on a 2-core AVX-512 host:
# pytest 714 s -> 518 s (the retraining 110 s, the user trees 140 s and the sweep 31 s now overlap the rest).
# pytest-xdist with two workers was measured too and gained less (660 s): two workers oversubscribe the 2 cores
# (the retraining took 373 s instead of 110 s).
_EARLY: dict[str, Future] = {}
_EARLY_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early")  # one job at a time: 2 cores
_EARLY_PROCESSES: list[subprocess.Popen] = []


def early(key: str, job: Callable[[], T]) -> Future[T]:
    """``job`` started once per session (the first call submits it, later calls get the same future)."""
    if key not in _EARLY:
        _EARLY[key] = _EARLY_POOL.submit(job)
    return _EARLY[key]


def early_process(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python args...`` at a lower CPU priority with passive OpenMP waits (a background job's threads must not
    spin on the cores the foreground tests use; neither changes what is computed). Killed at the session's end."""
    env = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(10))
    _EARLY_PROCESSES.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for module in dict.fromkeys(item.module for item in session.items if getattr(item, "module", None)):
        if callable(getattr(module, "start_early", None)):
            module.start_early()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for proc in _EARLY_PROCESSES:
        if proc.poll() is None:
            proc.kill()
    for future in _EARLY.values():
        future.cancel()
    _EARLY_POOL.shutdown(wait=False, cancel_futures=True)
