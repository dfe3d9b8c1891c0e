"""Shared fixtures. Trained weights are shipped (training/weights/); exported graphs come from `make export`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
import torch

if TYPE_CHECKING:
    from serving.server import TritonServer

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


# ------------------------------------------------------------------ servers shared by the session
# One tritonserver per configuration, started on first use and stopped when the session ends: a start costs 5-20 s
# on 2 cores and a stop 1-9 s, so modules that only infer against the same repository share one. Kept apart, each
# in its own module or test, and saying why there: servers a test kills or crashes (SIGKILLed stubs, the killer
# request, the supervisor's crash loop), pinned to CPUs, started by a CLI or a subprocess stack, counting from zero
# (Prometheus), or serving a repository of their own (toy specs, load errors, a fresh int8 graph, user models, the
# explorer's subset, a backend file under test). The rules for a test that shares one: each fixture's docstring.
_STOPS: list[tuple[str, bool, Future]] = []
_STOP_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stop")


def stop_in_background(server: TritonServer, what: str, clean: bool = False) -> None:
    """Stop a module's ``server`` in a thread while the next tests run: most of a
    shutdown is waiting (Triton checks its models once a second while the stubs exit; measured on 2 cores: the
    46-model server's 4.8 s stop kept the host 24% busy). ``clean``: the session's end asserts exit code 0."""
    _STOPS.append((what, clean, _STOP_POOL.submit(server.stop)))


@pytest.fixture(scope="session", autouse=True)
def _background_stops_finished():
    """Every server stopped in the background has exited before the session ends (and, where asked, cleanly)."""
    yield
    codes = [(what, clean, future.result(timeout=120)) for what, clean, future in _STOPS]
    unclean = [f"{what}: exit code {code}" for what, clean, code in codes if clean and code != 0]
    assert not unclean, f"servers that did not exit cleanly: {'; '.join(unclean)}"


@pytest.fixture(scope="session")
def untrained_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A temp repository with an untrained ``cnn`` (seed 0) exported and parity-checked here, its image models and
    the pass-through floor model; no trained artifacts needed. Returns (repo, the torch model). Read only: a test
    that needs a changed repository copies it."""
    from export import manifest
    from export.onnx_export import export_onnx
    from export.parity import check_parity
    from export.pipeline import graph_paths
    from serving import repository as rep
    from training.registry import create_model, get_spec

    repo = tmp_path_factory.mktemp("untrained-repo")
    spec = get_spec("cnn")
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    files = graph_paths(spec, repo_dir=repo)
    for g in spec.deploy_graphs():
        export_onnx(spec, model, files[g.name], graph=g)
    parity = check_parity(spec, model, files)  # raises on a failure: the manifest records a real verdict
    manifest.write(spec, files, {"passed": True, "max_abs": parity.worst, "agreement": parity.min_agreement},
                   repo_dir=repo)
    rep.write_repository(["cnn"], "cpu", repo)
    return repo, model


@pytest.fixture(scope="session")
def untrained_server(untrained_repo: tuple[Path, torch.nn.Module]):
    """tritonserver on free loopback ports (HTTP, gRPC, metrics; admin key set) serving every model of
    ``untrained_repo``: cnn, cnn_image, cnn_preprocess, passthrough. A test may unload and load a model but leaves
    every model loaded and healthy; it never kills the server or a stub; counters are shared (compare deltas)."""
    import gc

    from serving.server import TritonServer, free_ports, port_free

    http, grpc, metrics = free_ports(3)  # never collide with a `make serve` on 8000-8002
    srv = TritonServer(untrained_repo[0], http_port=http, grpc_port=grpc, metrics_port=metrics).start()
    yield srv
    # Clients the tests left open (held by exception tracebacks) keep HTTP connections: Triton waits for open
    # connections until its exit timeout, then exits 1. Collect them first, as a closing client would.
    gc.collect()
    assert srv.stop() == 0  # a clean SIGTERM shutdown, after every module that shared it
    assert all(port_free(p) for p in (srv.http_port, srv.grpc_port, srv.metrics_port))
