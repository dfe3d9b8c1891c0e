"""Start, probe and stop a real NVIDIA Triton Inference Server (the one pip's nvidia-pytriton ships).

The pip tritonserver (2.51, python backend only) needs three things this module sets up:
- a backend folder ``backends/python/`` holding ``libtriton_python.so``, ``triton_python_backend_utils.py``
  and a copy of the Python 3.11 stub (prepared once under ``build/triton/``);
- ``LD_LIBRARY_PATH`` with ``nvidia_pytriton.libs`` and this Python's own LIBDIR: otherwise the stub loads
  the system libpython beside this one and native code crashes;
- this venv's ``bin`` first on ``PATH``: the stub's embedded interpreter finds the venv (numpy,
  onnxruntime) that way; ``PYTHONPATH`` alone does not work.

Models load with explicit model control, so one model that fails to load (missing or corrupt graph) is
reported with its reason while the others are served. Readiness means more than Triton's READY flag: a
python stub that died leaves its model READY while every request fails, so ``probe`` sends a real inference.

    python -m serving.server [--repo DIR] [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from serving import admin
from serving.cli import cli_error

EXIT_TIMEOUT_S = 5
# What Triton says of a model that exists but cannot answer right now (being loaded or unloaded, its python stub
# dead or restarting): worth the same request again shortly, unlike an unknown model. The front door and the
# client both read Triton's answers with it.
# gRPC's own reconnect backoff (1 s growing to 120 s) would keep a channel failing fast for long after a restarted
# server is back (measured: the front door saw the stack ready again only 34 s after the last of 10 SIGKILLs): every
# channel to Triton keeps it short, so that retries and probes decide the pace.
RECONNECT_BACKOFF = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
TRITON_RELOADING = re.compile(r"no available versions|is not ready|not healthy|stub process|unloading|loading", re.I)
# Files the server and its stubs create (log, the stubs' __pycache__, onnxruntime's cache) are their owner's only.
PRIVATE_UMASK = 0o077
# The python backend's shared-memory regions hold every request's tensors, and boost::interprocess fchmods
# them to 0644 whatever the umask: so the server gets a /dev/shm of its own, a 0700 tmpfs in a private mount
# namespace (unshare), that no other process sees.
PRIVATE_SHM = 'mount -t tmpfs -o mode=0700,nosuid,nodev tmpfs /dev/shm && exec "$0" "$@"'
STUB_PYTHON = "3.11"
PRIVATE_SOCKET = "grpc.sock"
# The supervisor's restart backoff: 1 s doubling to this cap. A restart costs ~3 s of one core here, so a crash loop
# at the cap spends about a third of a core, and after any storm of deaths the server is back within cap + start.
BACKOFF_BASE_S, BACKOFF_MAX_S = 1.0, 10.0


class ServerError(RuntimeError):
    """A one-line problem starting or talking to the server."""


# ------------------------------------------------------------------------------------------ locations


def _site_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (pytriton's import is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"package {name!r} is not installed: pip install nvidia-pytriton==0.7.0")
    return Path(next(iter(spec.submodule_search_locations)))


def triton_home() -> Path:
    return _site_package("pytriton") / "tritonserver"


def triton_libs() -> Path:
    return _site_package("pytriton").parent / "nvidia_pytriton.libs"


def tritonserver_bin() -> Path:
    path = triton_home() / "bin" / "tritonserver"
    if not path.exists():
        raise ServerError(f"tritonserver binary not found at {path}")
    return path


def runtime_dir() -> Path:
    env = os.environ.get("ATTNZOO_TRITON_RUNTIME")
    if env:
        return Path(env)
    from training import paths

    return paths.REPO_ROOT / "build" / "triton"


def prepare_runtime(root: Path | None = None) -> Path:
    """Backend folder for tritonserver and the unversioned library names perf_analyzer asks for."""
    root = Path(root or runtime_dir())
    home, libs = triton_home(), triton_libs()
    backend = root / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": home / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": home / "backends" / "python" / "triton_python_backend_utils.py",
        # The backend launches "<backend dir>/triton_python_backend_stub"; a copy, as it resolves its
        # own libraries relative to where it sits.
        "triton_python_backend_stub": home / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        dst = backend / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
            shutil.copy2(src, tmp)
            tmp.replace(dst)
    lib = root / "lib"
    lib.mkdir(exist_ok=True)
    for soname, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        found = sorted(libs.glob(pattern))
        link = lib / soname
        if found and not link.exists():
            with contextlib.suppress(FileExistsError):  # another process made it first
                link.symlink_to(found[0])
    return root


def server_env(root: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver (and perf_analyzer): library path and the venv first on PATH."""
    root = Path(root or runtime_dir())
    env = dict(os.environ if base is None else base)
    libdirs = [str(triton_libs()), sysconfig.get_config_var("LIBDIR") or "", str(root / "lib")]
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + ([old] if old else []))
    venv_bin = str(Path(sys.executable).parent)  # not resolved: the venv's bin, not the base Python's
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ from the stubs inside the model repository
    return env


# -------------------------------------------------------------------------------------------- helpers


@functools.cache
def private_shm_wrapper() -> tuple[str, ...]:
    """The command prefix that runs a program with its own /dev/shm (see PRIVATE_SHM), or () where this host
    does not allow mount namespaces (then the regions are 0644 in the shared /dev/shm: `serving/README.md`)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    user = () if os.geteuid() == 0 else ("--map-current-user",)  # a user namespace lets a user mount a tmpfs
    wrapper = (unshare, "--mount", "--propagation", "private", *user, "--", "/bin/sh", "-c", PRIVATE_SHM)
    try:
        ok = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return wrapper if ok else ()


def _private_log(path: Path) -> Any:
    """The server's log, opened for writing with mode 0600 (also when it exists: a --log path reused)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: a port only held by TIME_WAIT connections of a stopped server is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free right now (for tests that must not collide with a running `make serve`)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 10.0,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def _first_line(text: str | None) -> str:
    # Python-backend errors carry a Python traceback ("\n\nAt:\n  model.py(47): initialize"): keep the message.
    return (text or "").strip().split("\n\nAt:")[0].strip()


PROBE_IMAGE = "P3\n2 2\n255\n" + "40 80 120 " * 4


def check_target(repository: Path) -> dict[str, Any] | None:
    """The repository's stamp (``serving.repository.write_stamp``); a repository generated for another target
    than this tritonserver's (pip's has only the python backend: ``--target cpu``) is refused, naming both."""
    from serving.repository import STAMP_FILE, read_stamp

    stamp = read_stamp(repository)
    if stamp is not None and stamp.get("target") != "cpu":
        raise ServerError(f"{repository} was generated for --target {stamp.get('target')} (its {STAMP_FILE}); this "
                          f"tritonserver (nvidia-pytriton) has only the python backend: serve it with NVIDIA's "
                          f"Triton container, or run `attnzoo repository --target cpu` for this one")
    return stamp


def probe_inputs(config: dict) -> list[dict]:
    """A real, small request from the model's own config: warm-up dims where given, else 64 for -1."""
    warm = (config.get("model_warmup") or [{}])[0].get("inputs", {})
    inputs = []
    for i in config["input"]:
        dims = [int(d) for d in warm.get(i["name"], {}).get("dims", [])] or [64 if int(d) < 0 else int(d)
                                                                              for d in i["dims"]]
        shape = ([1] if int(config.get("max_batch_size", 0)) > 0 else []) + dims
        n = 1
        for d in shape:
            n *= d
        dtype = i["data_type"].removeprefix("TYPE_")
        value = False if dtype == "BOOL" else 0
        if dtype == "STRING":  # an encoded image file (``<model>_image``): a 2x2 plain-text PPM fits in JSON
            dtype, value = "BYTES", PROBE_IMAGE
        inputs.append({"name": i["name"], "shape": shape, "datatype": dtype, "data": [value] * n})
    return inputs


# --------------------------------------------------------------------------------------------- server


class TritonServer:
    """A tritonserver process on 127.0.0.1; use as a context manager or with start()/stop().

    ``load_errors`` maps each model that failed to load to Triton's reason (which names the file).
    With ``require_all=True`` (the CLI's default) any load error fails ``start``.
    """

    def __init__(self, repository: str | Path | None = None, models: Sequence[str] | None = None, *,
                 host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, startup_timeout: float = 120.0, require_all: bool = False,
                 probe: bool = True, log_path: str | Path | None = None, verbose: int = 0,
                 extra_args: Iterable[str] = (), cpus: Iterable[int] | None = None,
                 admin_key: str | None = None, key_file: Path | None = None, private: bool = False) -> None:
        from serving.repository import served_models
        from training.layout import repository_root

        self.repository = repository_root(repository).resolve()
        self.models = list(models) if models is not None else served_models(self.repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.startup_timeout, self.require_all, self.probe_on_start = startup_timeout, require_all, probe
        self.verbose, self.extra_args = verbose, list(extra_args)
        # CPU affinity of the server and its python-backend stubs (they inherit it); None: every core.
        self.cpus = sorted(cpus) if cpus is not None else None
        self._log_arg = Path(log_path) if log_path else None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.load_errors: dict[str, str] = {}
        # private: Triton's gRPC API on a unix socket in a 0700 folder, its HTTP API off, so that only this user
        # (the supervisor, the front door) reaches it and no key is needed; else loopback ports, where the admin
        # key (serving.admin) locks model control etc. and this object's own calls carry it.
        self.private = private
        self.admin_key = None if private else admin_key or admin.new_key()
        self.key_file = None if private else key_file
        self.socket_dir: Path | None = None
        self._client: Any = None
        # The python backend's shared-memory regions carry this prefix, so a dead server's are found and removed.
        self.shm_prefix = f"attnzoo_{os.getpid()}_{id(self):x}_"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {admin.HTTP_HEADER: self.admin_key} if self.admin_key else {}

    # urls
    @property
    def http_url(self) -> str:
        if self.private:
            raise ServerError("a private server has no HTTP port (its gRPC API is a unix socket: grpc_url)")
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port, or for a private server unix://<0700 folder>/grpc.sock:0 (Triton appends ':<port>')."""
        if self.private:
            if self.socket_dir is None:
                self.socket_dir = Path(tempfile.mkdtemp(prefix="attnzoo-triton-"))  # 0700
                weakref.finalize(self, shutil.rmtree, self.socket_dir, True)
            return f"unix://{self.socket_dir / PRIVATE_SOCKET}:0"
        return f"{self.host}:{self.grpc_port}"

    def _ports(self) -> dict[str, int]:
        ports = {"metrics": self.metrics_port}
        return ports if self.private else {"http": self.http_port, "grpc": self.grpc_port, **ports}

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, runtime: Path) -> list[str]:
        if self.private:
            listen = ["--allow-http=false", f"--grpc-address=unix:{self.grpc_url.removeprefix('unix://')[:-2]}",
                      "--grpc-port=0"]
        else:
            listen = [f"--http-address={self.host}", f"--http-port={self.http_port}",
                      f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                      *admin.server_flags(self.admin_key)]
        cmd = [
            str(tritonserver_bin()),
            f"--model-repository={self.repository}",
            f"--backend-directory={runtime / 'backends'}",
            *listen,
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--model-control-mode=explicit",
            # One model that fails to load must not take the others down; readiness is per model.
            "--exit-on-error=false", "--strict-readiness=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        return [*private_shm_wrapper(), *cmd, *self.extra_args]

    # lifecycle
    def start(self) -> TritonServer:
        if self.proc is not None:
            raise ServerError("server already started")
        if not self.models:
            raise ServerError(f"no models to serve in {self.repository} (no */config.pbtxt): run `make export`")
        check_target(self.repository)
        for what, port in self._ports().items():
            if not port_free(port, self.host):
                raise ServerError(f"{what} port {self.host}:{port} is already in use (a server running already?)")
        runtime = prepare_runtime()
        if self.private:  # a socket left by a server that died
            Path(self.grpc_url.removeprefix("unix://")).unlink(missing_ok=True)
        if self.key_file is not None and self.admin_key:
            admin.write_key(self.admin_key, self.key_file)
        if self._log_arg:
            self.log_path = self._log_arg
        else:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")  # 0600
            os.close(fd)
            self.log_path = Path(name)
        with _private_log(self.log_path) as log:
            self.proc = subprocess.Popen(self.command(runtime), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=server_env(runtime),
                                         start_new_session=True,  # Ctrl-C reaches us, and we stop it cleanly
                                         umask=PRIVATE_UMASK, preexec_fn=self._pin if self.cpus else None)
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _pin(self) -> None:
        os.sched_setaffinity(0, self.cpus)

    def log_tail(self, n: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # The control plane speaks gRPC: the one API a private server has.
    def _control(self) -> Any:
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=RECONNECT_BACKOFF)
        return self._client

    def _call(self, method: str, *args: Any, admin_api: bool = False, **kwargs: Any) -> Any:
        """One control call; a refusal or a dead server raises ServerError with Triton's one-line reason."""
        from tritonclient.utils import InferenceServerException

        if admin_api and self.admin_key:
            kwargs["headers"] = {admin.GRPC_HEADER: self.admin_key}
        try:
            return getattr(self._control(), method)(*args, **kwargs)
        except InferenceServerException as e:
            raise ServerError(_first_line(e.message() or str(e))) from None

    def live(self) -> bool:
        try:
            return bool(self._call("is_server_live", client_timeout=2))
        except ServerError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServerError(f"tritonserver exited with code {self.proc.returncode if self.proc else '?'}; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            if self.live():
                states = self.model_states()
                pending = [m for m in self.models if states.get(m, {}).get("state") not in ("READY", "UNAVAILABLE")]
                if not pending:
                    break
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.1)
        self.load_errors = {m: _first_line(s.get("reason")) or "not loaded" for m, s in self.model_states().items()
                            if m in self.models and s.get("state") != "READY"}
        self.load_errors.update({m: "not in the repository" for m in self.models if m not in self.model_states()})
        if self.require_all and self.load_errors:
            raise ServerError("; ".join(f"model '{m}' failed to load: {r}" for m, r in self.load_errors.items()))
        if self.probe_on_start:
            bad = {m: err for m, err in self.health().items() if err and m not in self.load_errors}
            if bad:
                raise ServerError("; ".join(f"model '{m}' is loaded but a probe inference failed: {e}"
                                            for m, e in bad.items()))

    def stop(self) -> int | None:
        """SIGTERM, then wait for Triton's own exit timeout (+ margin); SIGKILL only if it hangs."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: takes the stub processes too
                proc.wait()
        self._reap(proc.pid)
        if proc.returncode == 0 and self._log_arg is None and self.log_path:
            self.log_path.unlink(missing_ok=True)  # our temp log; kept when the server did not exit cleanly
        return proc.returncode

    def _reap(self, pgid: int) -> None:
        """A python stub can outlive its server (parent pid 1, ignoring SIGTERM): kill what is left of the
        server's session, and remove its shared-memory regions (named with this server's prefix)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def shm_regions(self) -> list[Path]:
        """The python backend's shared-memory regions of the running server (in its own /dev/shm, if private)."""
        if not self.alive():
            return []
        return sorted(Path(f"/proc/{self.proc.pid}/root/dev/shm").glob(f"{self.shm_prefix}*"))

    def _children(self) -> list[tuple[int, str]]:
        """(pid, command line) of the server's child processes (its python-backend stubs)."""
        out = []
        if self.proc is None:
            return out
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid:
                out.append((int(d.name), cmd))
        return out

    def stub_pids(self, model: str) -> list[int]:
        """The python-backend stub processes serving ``model``."""
        from training import layout

        stub_file = str(layout.version_dir(model, self.repository) / layout.BACKEND_FILE)
        return [pid for pid, cmd in self._children() if stub_file in cmd]

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its stubs."""
        total = 0
        pids = ([self.proc.pid] if self.proc else []) + [pid for pid, _ in self._children()]
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def restart(self) -> float:
        """Stop what is left of the server, start it again on the same ports and key; returns the seconds
        until it serves again (ready, every model loaded and probed)."""
        t0 = time.monotonic()
        self.stop()
        deadline = t0 + 30
        while not all(port_free(p, self.host) for p in self._ports().values()):
            if time.monotonic() > deadline:
                raise ServerError("the old server's ports are still held after 30 s")
            time.sleep(0.1)
        self.start()
        return time.monotonic() - t0

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # model control and health
    def model_states(self) -> dict[str, dict]:
        """Repository index: {model: {"state": READY|UNAVAILABLE|LOADING|..., "reason": str}}."""
        index = self._call("get_model_repository_index", as_json=True, admin_api=True, client_timeout=10)
        return {m["name"]: m for m in index.get("models", [])}

    def model_config(self, model: str) -> dict:
        try:
            return self._call("get_model_config", model, as_json=True, client_timeout=10)["config"]
        except ServerError as e:
            raise ServerError(f"model '{model}': {e}") from None

    def load(self, model: str, config: str | None = None) -> None:
        """(Re)load a model, optionally with a JSON config override; raises with Triton's reason."""
        try:
            self._call("load_model", model, config=config, admin_api=True, client_timeout=120)
        except ServerError as e:
            raise ServerError(f"model '{model}' failed to load: {e}") from None

    def unload(self, model: str, wait: float = 30.0) -> None:
        try:
            self._call("unload_model", model, admin_api=True, client_timeout=60)
        except ServerError as e:
            raise ServerError(f"model '{model}' failed to unload: {e}") from None
        deadline = time.monotonic() + wait
        while self.model_states().get(model, {}).get("state") == "UNLOADING" and time.monotonic() < deadline:
            time.sleep(0.05)

    def reload(self, model: str) -> None:
        """Unload + load: brings back a model whose python stub died. (``load`` alone is a no-op for an
        unchanged model that Triton still counts as READY.) No wait for the unload: the old instance of a
        dead stub never finishes unloading, and the new one loads beside it."""
        self.unload(model, wait=0)
        self.load(model)

    def heal(self) -> dict[str, str]:
        """Reload every loaded model whose probe inference fails; returns {model: the probe's error}.

        Ensembles run no code of their own: one fails only because a step does, and serves again once that
        step is reloaded. So steps go first, and an ensemble is reloaded only if its probe still fails."""
        states = self.model_states()
        broken = {m: e for m, e in self.health().items() if e and states.get(m, {}).get("state") == "READY"}
        ensembles = {m for m in broken if self.model_config(m).get("platform") == "ensemble"}
        for m in broken.keys() - ensembles:
            self.reload(m)
        still = {m for m, e in self.health(sorted(ensembles)).items() if e}
        for m in still:
            self.reload(m)
        return {m: e for m, e in broken.items() if m not in ensembles or m in still}

    def probe(self, model: str) -> str | None:
        """A real inference (not just the READY flag); returns None if it worked, else the error."""
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import triton_to_np_dtype

        try:
            inputs = []
            for i in probe_inputs(self.model_config(model)):
                t = grpcclient.InferInput(i["name"], i["shape"], i["datatype"])
                data = [v.encode() for v in i["data"]] if i["datatype"] == "BYTES" else i["data"]
                dtype = object if i["datatype"] == "BYTES" else triton_to_np_dtype(i["datatype"])
                t.set_data_from_numpy(np.array(data, dtype=dtype).reshape(i["shape"]))
                inputs.append(t)
            self._call("infer", model, inputs, client_timeout=30)
        except ServerError as e:
            return str(e)
        return None

    def health(self, models: Iterable[str] | None = None) -> dict[str, str | None]:
        """{model: None if a probe inference succeeds, else the reason} for every served model."""
        states = self.model_states() if self.live() else {}
        out: dict[str, str | None] = {}
        for m in models if models is not None else self.models:
            s = states.get(m, {})
            if s.get("state") == "READY":
                out[m] = self.probe(m)
            else:
                out[m] = _first_line(s.get("reason")) or ("not loaded" if states else "server not live")
        return out


# ---------------------------------------------------------------------------------------------- supervisor


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


class Supervisor:
    """Keeps a tritonserver serving: restarts one that died (e.g. the HTTP frontend's std::bad_alloc on a request
    that claims a huge tensor), forever, and says why it died.

    A crash loop is never turned into an outage by giving up: consecutive deaths back off exponentially
    (``backoff_base_s`` doubling up to ``backoff_max_s``, 1 s and 10 s by default), and the streak is forgotten
    once the server has served for ``stable_s``. Nothing a dying server raises (a refused connection mid-probe, a
    restart that fails) ends ``run``. ``status()`` says where it stands; every log line carries it.

    ``check()`` is one look: None while the server is alive, else (after the backoff) a record of the restart
    attempt (``why``: the log's last error line, ``backoff_s``, ``ok``, ``restart_s``: seconds until it served
    again, or ``error``)."""

    def __init__(self, server: TritonServer, backoff_base_s: float = BACKOFF_BASE_S,
                 backoff_max_s: float = BACKOFF_MAX_S, stable_s: float = 60.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.server, self.base, self.cap, self.stable_s = server, backoff_base_s, backoff_max_s, stable_s
        self.restarts: list[dict[str, Any]] = []
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.state, self.last_reason, self.backoff_s, self.streak = "serving", None, 0.0, 0
        self._serving_since = time.monotonic()
        self._failed_start: str | None = None  # why the last restart attempt failed (its server is gone)
        self._stop = threading.Event()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": sum(r["ok"] for r in self.restarts), "attempts": len(self.restarts),
                "crashes_in_a_row": self.streak, "last_reason": self.last_reason, "backoff_s": self.backoff_s}

    def _status_text(self) -> str:
        st = self.status()
        return (f"[state {st['state']}, restarts {st['restarts']}, crashes in a row {st['crashes_in_a_row']}, "
                f"backoff {st['backoff_s']:g} s]")

    def _why(self) -> str:
        if self._failed_start:
            return self._failed_start
        code = self.server.proc.returncode if self.server.proc else None
        lines = [ln for ln in self.server.log_tail(40).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E") or "terminate" in ln or "what()" in ln or "Signal" in ln]
        detail = (errors or [f"no error in its log ({len(lines)} lines)"])[-1].strip()  # a SIGKILL leaves none
        sig = f"signal {-code} ({_signal_name(-code)})" if code is not None and code < 0 else f"exit code {code}"
        return f"{sig}: {detail[:300]}"

    def next_backoff(self) -> float:
        """base * 2^(deaths in a row - 1), capped."""
        return min(self.base * 2 ** max(self.streak - 1, 0), self.cap)

    def check(self) -> dict[str, Any] | None:
        if self.server.alive():
            if self.streak and time.monotonic() - self._serving_since >= self.stable_s:
                self.streak = 0  # served long enough: the next death starts the backoff afresh
            return None
        self.streak += 1
        self.last_reason, self.backoff_s, self.state = self._why(), self.next_backoff(), "backing-off"
        self.log(f"supervisor: tritonserver died ({self.last_reason}); restarting in {self.backoff_s:g} s "
                 f"{self._status_text()}")
        if self._stop.wait(self.backoff_s):
            return None
        return self._restart()

    def _restart(self) -> dict[str, Any]:
        self.state = "restarting"
        record: dict[str, Any] = {"at": time.monotonic(), "why": self.last_reason, "backoff_s": self.backoff_s}
        try:
            seconds = self.server.restart()
        except Exception as e:  # ports still held, dies again while starting, ...: the next check tries again
            self._failed_start = f"restart failed: {(str(e).strip().splitlines() or [''])[0][:300]}"
            self.state = "backing-off"
            self.restarts.append({**record, "ok": False, "error": self._failed_start})
            self.log(f"supervisor: {self._failed_start} {self._status_text()}")
            return self.restarts[-1]
        self._failed_start, self.state, self._serving_since = None, "serving", time.monotonic()
        self.restarts.append({**record, "ok": True, "restart_s": round(seconds, 2)})
        self.log(f"supervisor: serving again after {seconds:.1f} s {self._status_text()}")
        return self.restarts[-1]

    def watchdog(self) -> None:
        """Reload every model whose probe inference fails (a dead python stub keeps its model READY)."""
        for m, err in self.server.heal().items():
            self.log(f"watchdog: model '{m}' failed its probe ({err}); reloaded it")

    def run(self, watchdog_s: float = 10.0, poll_s: float = 0.5) -> None:
        """Until ``stop()``: restart a dead server, and every ``watchdog_s`` (0: never) heal broken models.
        No exception from a dying or restarting server ends it (KeyboardInterrupt does)."""
        next_probe = time.monotonic() + watchdog_s
        while not self._stop.wait(poll_s):
            try:
                self.check()
                if watchdog_s and time.monotonic() >= next_probe and self.server.alive():
                    next_probe = time.monotonic() + watchdog_s
                    self.watchdog()
            except Exception as e:  # e.g. URLError: the server died while the watchdog probed it
                self.log(f"supervisor: {type(e).__name__}: {_first_line(str(e))[:300]} (the next check "
                         f"handles it) {self._status_text()}")

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=None, help="model repository (default: model_repository/)")
    p.add_argument("--models", nargs="*", default=None, help="models to load (default: every config.pbtxt)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--no-generate", action="store_true",
                   help="serve the repository as it is (default: regenerate cpu configs first)")
    p.add_argument("--allow-load-errors", action="store_true", help="serve the models that load, report the rest")
    p.add_argument("--check", action="store_true", help="start, probe every model, stop (a smoke test)")
    p.add_argument("--watchdog", type=float, default=10.0,
                   help="seconds between probe inferences that reload a model whose stub died (0: off)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before restarting a dead server; doubles while it keeps dying")
    p.add_argument("--max-backoff", type=float, default=BACKOFF_MAX_S, help="cap of that backoff (it never gives up)")
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.add_argument("--verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    # SIGTERM (make, CI) stops the server as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = None
    try:
        if not args.no_generate:  # regenerate a cpu repository with its own selection; never another target's
            from serving.repository import write_repository
            from training.layout import repository_root

            stamp = check_target(repository_root(args.repo))
            write_repository(args.models, "cpu", args.repo, (stamp or {}).get("variant", "fp32"))
        server = TritonServer(args.repo, args.models, host=args.host, http_port=args.http_port,
                              grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                              startup_timeout=args.timeout, require_all=not args.allow_load_errors,
                              log_path=args.log, verbose=args.verbose, key_file=admin.default_key_file())
        t0 = time.monotonic()
        server.start()
        print(f"tritonserver ready in {time.monotonic() - t0:.1f} s: http {server.http_url}, grpc {server.grpc_url}, "
              f"metrics {server.metrics_url}; log {server.log_path}; admin APIs locked (key in "
              f"{server.key_file}, or ${admin.KEY_ENV})", flush=True)
        for m, err in server.health().items():
            print(f"  {m}: {'ok' if err is None else 'ERROR ' + err}", flush=True)
        if args.check:
            return 0 if not any(server.health().values()) else 1
        Supervisor(server, args.backoff, args.max_backoff).run(args.watchdog)
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)
    finally:
        if server is not None:
            code = server.stop()
            if code is not None:
                print(f"tritonserver stopped (exit code {code})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
