"""The admin key that locks Triton's model-control, shared-memory, logging and trace APIs.

Started by ``serving.server``, tritonserver refuses those APIs (HTTP 403, gRPC UNAVAILABLE) unless a request
carries the key; inference, health and metadata stay open. Without the lock, explicit model control lets
any client load a model whose files come inside the request, and the python backend runs that code.
The key is made afresh for every start, or taken from ``ATTNZOO_TRITON_ADMIN_KEY`` for deployments; the CLI
writes it to a file only its owner can read, where the project's own tools (and a local operator) find it.
stdlib only: the client imports it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_ENV = "ATTNZOO_TRITON_ADMIN_KEY"
RESTRICTED = ("model-repository", "shared-memory", "logging", "trace")
KEY_NAME = "admin-key"
HTTP_HEADER = KEY_NAME  # what Triton's HTTP frontend reads
GRPC_HEADER = f"triton-grpc-protocol-{KEY_NAME}"  # the gRPC frontend prefixes the key name


def default_key_file() -> Path:
    from training import paths

    return paths.REPO_ROOT / "build" / "triton" / KEY_NAME


def new_key() -> str:
    return os.environ.get(KEY_ENV) or secrets.token_urlsafe(24)


def write_key(key: str, path: Path | None = None) -> Path:
    """Write ``key`` readable by its owner only (0600, created so; never world-readable for an instant)."""
    path = Path(path or default_key_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    tmp.replace(path)
    return path


def read_key(path: Path | None = None) -> str | None:
    """The key from the environment, else from the key file of the last `make serve` (None if neither)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    try:
        return Path(path or default_key_file()).read_text().strip() or None
    except OSError:
        return None


def server_flags(key: str) -> list[str]:
    apis = ",".join(RESTRICTED)
    return [f"--http-restricted-api={apis}:{KEY_NAME}={key}", f"--grpc-restricted-protocol={apis}:{KEY_NAME}={key}"]
