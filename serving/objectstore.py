"""The model repository in object storage: push it to an S3 URL and serve it from there.

URLs are Triton's own form: ``s3://bucket/prefix`` (AWS) or ``s3://host:port/bucket/prefix`` (a private S3 such
as MinIO; ``s3://http://host:port/...`` or ``https://`` to say the scheme, http by default). Credentials come from
the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` variables, read by boto3 here
and by tritonserver's own S3 filesystem. Triton copies the models it loads to a local temp folder (no cache: a
reload fetches them again), so an object replaced in the bucket is served after the model is reloaded.

    python -m serving.objectstore push s3://127.0.0.1:9000/models/zoo [--repo DIR] [--models cnn ...]
    python -m serving.objectstore ls s3://127.0.0.1:9000/models/zoo

``LocalS3`` runs ``moto_server`` (PyPI ``moto[server]``) on loopback: the S3 stand-in the tests use.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.cli import cli_error
from serving.process import terminate
from serving.server import TritonServer, free_ports
from training import layout

# Triton's pattern (core's s3 filesystem): an optional scheme, then host:port, then bucket/prefix.
_HOSTED = re.compile(r"^s3://(?:(https?)://)?([0-9A-Za-z\-.]+):(\d+)/([^/]+)/?(.*)$")
_AWS = re.compile(r"^s3://([^/:]+)/?(.*)$")
SKIP_PARTS = {"__pycache__"}


class ObjectStoreError(RuntimeError):
    """A one-line problem with an S3 URL or the bucket."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root
    endpoint: str | None = None  # http(s)://host:port; None for AWS

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))


def parse_url(url: str) -> S3Location:
    m = _HOSTED.match(url)
    if m:
        scheme, host, port, bucket, prefix = m.groups()
        return S3Location(bucket, prefix.strip("/"), f"{scheme or 'http'}://{host}:{port}")
    m = _AWS.match(url)
    if m:
        return S3Location(m.group(1), m.group(2).strip("/"))
    raise ObjectStoreError(f"not an S3 repository URL: {url!r} (expected s3://bucket/prefix or "
                           "s3://host:port/bucket/prefix)")


def is_s3(repository: str | Path | None) -> bool:
    return isinstance(repository, str) and repository.startswith("s3://")


def client(loc: S3Location) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError("boto3 is not installed: pip install boto3") from None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=loc.endpoint, region_name=region,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))


def _files(root: Path, models: Iterable[str]) -> list[tuple[Path, str]]:
    out = []
    for m in models:
        for p in sorted((root / m).rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and not SKIP_PARTS & set(rel.parts):
                out.append((p, rel.as_posix()))
    return out


def push(url: str, repo: str | Path | None = None, models: Sequence[str] | None = None) -> list[str]:
    """Upload every model folder (``models``: those only) of a local repository; returns the keys written.
    Creates the bucket if it does not exist."""
    from serving.repository import served_models

    loc, root = parse_url(url), layout.repository_root(repo)
    names = list(models) if models else served_models(root)
    missing = [m for m in names if not (root / m / layout.CONFIG_FILE).exists()]
    if missing or not names:
        raise ObjectStoreError(f"no {layout.CONFIG_FILE} for {missing or 'any model'} in {root}: run `make export`")
    s3 = client(loc)
    try:
        s3.head_bucket(Bucket=loc.bucket)
    except Exception:
        s3.create_bucket(Bucket=loc.bucket)
    keys = []
    for path, rel in _files(root, names):
        key = loc.key(rel)
        s3.upload_file(str(path), loc.bucket, key)
        keys.append(key)
    return keys


def list_models(url: str) -> list[str]:
    """Models in the bucket: the folders under the prefix that hold a config.pbtxt."""
    loc = parse_url(url)
    base = loc.key() + "/" if loc.prefix else ""
    found = set()
    for page in client(loc).get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=base):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(base):].split("/")
            if len(rel) == 2 and rel[1] == layout.CONFIG_FILE:
                found.add(rel[0])
    return sorted(found)


def put(url: str, rel: str, data: bytes) -> str:
    """Write (or replace) one object, ``rel`` relative to the repository (``cnn/1/model.onnx``)."""
    loc = parse_url(url)
    key = loc.key(rel)
    client(loc).put_object(Bucket=loc.bucket, Key=key, Body=data)
    return key


def get(url: str, rel: str) -> bytes:
    loc = parse_url(url)
    return client(loc).get_object(Bucket=loc.bucket, Key=loc.key(rel))["Body"].read()


class S3TritonServer(TritonServer):
    """A ``TritonServer`` whose ``--model-repository`` is an S3 URL; with ``models=None`` it serves every model
    in the bucket (listed with boto3, as the server needs the names for explicit model control)."""

    def __init__(self, url: str, models: Sequence[str] | None = None, **kw: Any) -> None:
        parse_url(url)
        names = list(models) if models is not None else list_models(url)
        if not names:
            raise ObjectStoreError(f"no models (no */{layout.CONFIG_FILE}) under {url}: push them first")
        # The base class resolves a local folder; the placeholder is never read, the URL replaces it.
        super().__init__(tempfile.gettempdir(), names, **kw)
        self.repository = url  # type: ignore[assignment]  # only ever formatted into --model-repository

    def start(self) -> S3TritonServer:
        # Without a region the AWS SDK asks the EC2 metadata service for one, and waits for it to time out.
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        super().start()
        return self

    def stub_pids(self, model: str) -> list[int]:
        """Triton runs the stubs from a temp copy of the model folder (``/tmp/folderXXXX/1/model.py``, no model
        name in it): matched by the instance name the stub is given (``<model>_<group>_<instance>``)."""
        instance = re.compile(rf"^{re.escape(model)}_\d+_\d+$")
        return [pid for pid, cmd in self._children() if any(instance.match(a) for a in cmd.split())]


def make_server(repository: str | Path | None, models: Sequence[str] | None = None, **kw: Any) -> TritonServer:
    """A ``TritonServer`` for a local folder or an ``s3://`` URL."""
    if is_s3(repository):
        return S3TritonServer(str(repository), models, **kw)
    return TritonServer(repository, models, **kw)


# ---------------------------------------------------------------------------------------- local stand-in


class LocalS3:
    """``moto_server`` on 127.0.0.1 (an S3 API in memory), with its request log for checking what was fetched.
    Sets dummy AWS credentials in this process's environment (moto accepts any) unless some are set already."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        fd, name = tempfile.mkstemp(prefix="moto-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{self.endpoint}/{bucket}" + (f"/{prefix.strip('/')}" if prefix else "")

    def start(self, timeout: float = 30.0) -> LocalS3:
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
            os.environ.setdefault(k, v)
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise ObjectStoreError(f"moto_server not found at {exe}: pip install 'moto[server]'")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ObjectStoreError(f"moto_server did not start; log {self.log_path}") from None
                time.sleep(0.1)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request moto logged so far."""
        text = self.log_path.read_text(errors="replace")
        return re.findall(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/', text)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.objectstore", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("push", help="upload the local repository (model folders with a config.pbtxt)")
    ps.add_argument("url", help="s3://bucket/prefix or s3://host:port/bucket/prefix")
    ps.add_argument("--repo", type=Path, default=None, help="local repository (default: model_repository/)")
    ps.add_argument("--models", nargs="*", default=None, help="models to push (default: all)")
    pl = sub.add_parser("ls", help="list the models in the bucket")
    pl.add_argument("url")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        if args.cmd == "push":
            keys = push(args.url, args.repo, args.models)
            print(f"pushed {len(keys)} objects to {args.url}")
        else:
            print("\n".join(list_models(args.url)))
        return 0
    except Exception as e:
        return cli_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
