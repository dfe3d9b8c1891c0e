"""Stopping a child process the way every serving component does: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import subprocess


def terminate(proc: subprocess.Popen | None, grace_s: float = 10.0) -> int | None:
    """SIGTERM ``proc`` if it still runs, wait ``grace_s`` for it to exit, else SIGKILL; its exit code (None: no
    process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
