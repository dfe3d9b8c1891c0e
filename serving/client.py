"""A small client for the served models, over gRPC or HTTP (``tritonclient``), and its CLI.

Everything model-specific comes from the server: input names, dtypes, dims, bounds and ``max_batch_size``
from the model's config, and how to present each output from the config parameter ``output_kinds`` that
``serving.repository`` writes from the spec; each kind (``training.tasks``: class logits -> predictions,
segmentation -> mask summary, boxes -> coordinates, maps -> peaks, anything else -> a shape summary)
presents itself. So RA-CNN's APN boxes print with no RA-CNN code here. ``Client.infer(feeds) -> outputs``
is the same runner interface as ``export.runners``: the serving tests compare it with torch directly.

    python -m serving.client --model racnn --protocol grpc image.png [more.png | x.npy ...]
    python -m serving.client --model cnn --protocol http --sample 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.cli import cli_error
from serving.contract import Contract
from serving.server import RECONNECT_BACKOFF, TRITON_RELOADING
from serving.validation import InputError, ModelRules, check_arrays
from training.tasks import output_kind

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
# Besides Triton's reloading answers (serving.server.TRITON_RELOADING), the front door's own 503 text. Inference
# is idempotent: repeating it is safe.
TRANSIENT = re.compile(rf"{TRITON_RELOADING.pattern}|unavailable", re.I)
RETRY_STATUSES = {"StatusCode.UNAVAILABLE", "503"}


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first, waiting ``base_s`` doubling up to ``max_s`` between them."""

    retries: int = 4
    base_s: float = 0.5
    max_s: float = 8.0

    def delays(self) -> Iterator[float]:
        for i in range(max(self.retries, 0)):
            yield min(self.base_s * 2**i, self.max_s)


def retryable(e: BaseException) -> bool:
    """A refused or reset connection, gRPC UNAVAILABLE, HTTP 503, or Triton saying a model is (re)loading."""
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        return str(e.status() or "") in RETRY_STATUSES or bool(TRANSIENT.search(e.message() or ""))
    return isinstance(e, OSError)  # ConnectionRefusedError / ConnectionResetError from the HTTP client


class ClientError(RuntimeError):
    """A one-line problem: server down, unknown model, bad input."""


class InferenceError(ClientError):
    """The server answered one request with an error (``status`` is Triton's, e.g. 400 / INVALID_ARGUMENT)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # per sample; -1 dynamic
    optional: bool = False  # the server feeds its default when a request leaves it out


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    output_kinds: dict[str, str] = field(default_factory=dict)
    description: str = ""
    input_bounds: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)  # input -> axis -> range
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # integer input -> values
    labelled: tuple[str, ...] = ()  # outputs with a label file: Triton's classification extension (class_count)
    rules: ModelRules | None = None  # what the server accepts (serving.validation: the front door's and backend's)

    @staticmethod
    def from_config(cfg: dict) -> ModelInfo:
        from tritonclient.utils import triton_to_np_dtype

        def tensors(key: str) -> tuple[TensorInfo, ...]:
            out = []
            for t in cfg.get(key, []):
                dt = t["data_type"].removeprefix("TYPE_")
                out.append(TensorInfo(t["name"], np.dtype(triton_to_np_dtype("BYTES" if dt == "STRING" else dt)),
                                      tuple(int(d) for d in t["dims"]), bool(t.get("optional", False))))
            return tuple(out)

        c = Contract.from_config(cfg)
        return ModelInfo(cfg["name"], int(cfg.get("max_batch_size", 0)), tensors("input"), tensors("output"),
                         c.output_kinds, c.description, c.input_bounds, c.input_ranges,
                         tuple(t["name"] for t in cfg.get("output", []) if t.get("label_filename")),
                         ModelRules.from_config(cfg, c))

    def input_shape_text(self, t: TensorInfo) -> str:
        return "[" + ", ".join(["B", *("?" if d < 0 else str(d) for d in t.dims)]) + "]"


class Client:
    """One model on one server. gRPC clients are thread-safe; the HTTP client is not (``infer_many`` uses its
    asyncio API instead of threads)."""

    def __init__(self, model: str, protocol: str = "grpc", url: str | None = None, *, timeout: float = 30.0,
                 retries: int = 4, retry_base_s: float = 0.5, retry_max_s: float = 8.0) -> None:
        """``retries``: how often an unreachable server, or an inference refused as UNAVAILABLE (server or
        model restarting), is tried again, with exponential backoff (``retry_base_s`` doubling up to
        ``retry_max_s``); 0: never."""
        if protocol not in PROTOCOLS:
            raise ClientError(f"unknown protocol {protocol!r}; choose grpc or http")
        self.model, self.protocol, self.timeout = model, protocol, timeout
        self.retry = RetryPolicy(retries, retry_base_s, retry_max_s)
        self.url = url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        try:
            self._client = tc.InferenceServerClient(self.url, **self._client_options())
        except Exception as e:
            raise ClientError(f"cannot create a {protocol} client for {self.url}: {e}") from None
        self._with_retries(self._check_server, lambda e: "not reachable" in str(e))
        self.info = self._model_info()

    def _client_options(self) -> dict[str, Any]:
        if self.protocol == "http":
            return {"network_timeout": self.timeout, "connection_timeout": self.timeout}
        from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

        return {"channel_args": [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                                 ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE), *RECONNECT_BACKOFF]}

    def _with_retries(self, call: Callable[[], Any], again: Callable[[Exception], bool] = retryable) -> Any:
        """``call()``, repeated after each backoff delay while it fails with an error ``again`` accepts."""
        delays = self.retry.delays()
        while True:
            try:
                return call()
            except Exception as e:
                delay = next(delays, None) if again(e) else None
                if delay is None:
                    raise
                time.sleep(delay)

    # -- setup
    def _check_server(self) -> None:
        try:
            live = self._client.is_server_live()
        except Exception:
            live = False
        if not live:
            raise ClientError(f"Triton server not reachable at {self.url} ({self.protocol}); "
                              "start it with `make serve` (python -m serving.server)")

    def served_models(self) -> dict[str, dict]:
        """The repository index (an admin API: a locked server refuses it without the admin key)."""
        from serving import admin

        key = admin.read_key()
        header = admin.GRPC_HEADER if self.protocol == "grpc" else admin.HTTP_HEADER
        index = self._client.get_model_repository_index(headers={header: key} if key else None,
                                                        **({"as_json": True} if self.protocol == "grpc" else {}))
        rows = index.get("models", []) if isinstance(index, dict) else index
        return {r["name"]: r for r in rows}

    def _not_ready(self) -> ClientError:
        try:  # the index names the served models and why this one is not ready, where the server allows it
            models = self.served_models()
        except Exception:
            return ClientError(f"model {self.model!r} is not served (or not ready) at {self.url}")
        if self.model not in models:
            return ClientError(f"unknown model {self.model!r}; served models: {', '.join(sorted(models)) or 'none'}")
        state, reason = models[self.model].get("state", ""), models[self.model].get("reason", "")
        why = f": {reason.strip().splitlines()[0]}" if reason.strip() else ""
        return ClientError(f"model {self.model!r} is not ready ({state or 'not loaded'}){why}")

    def _model_info(self) -> ModelInfo:
        try:
            ready = self._client.is_model_ready(self.model)
        except Exception:
            ready = False
        if not ready:
            raise self._not_ready()
        if self.protocol == "grpc":
            cfg = self._client.get_model_config(self.model, as_json=True)["config"]
        else:
            cfg = self._client.get_model_config(self.model)
        return ModelInfo.from_config(cfg)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _http_many(self, items: list[dict[str, np.ndarray]], concurrency: int,
                         check: Callable[[int, Any], dict[str, np.ndarray]]) -> list[Any]:
        # tritonclient.http's gevent async_infer sleeps 10 ms per call (caps at ~100 req/s): use its
        # asyncio client (tritonclient.http.aio) with at most ``concurrency`` requests in flight.
        from tritonclient.http.aio import InferenceServerClient

        client = InferenceServerClient(self.url, conn_limit=concurrency, conn_timeout=self.timeout)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Any:
            async with gate:
                reqs, outs = self._request(items[i])
                try:
                    return check(i, await client.infer(self.model, reqs, outputs=outs, request_id=str(i)))
                except InferenceError as e:
                    return e
                except Exception as e:
                    return self._error(e)

        try:
            return await asyncio.gather(*(one(i) for i in range(len(items))))
        finally:
            await client.close()

    # -- requests
    def as_inputs(self, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(x, dict):
            return x
        required = [t for t in self.info.inputs if not t.optional]
        if len(required) != 1:
            raise ClientError(f"model {self.model!r} takes {len(required)} inputs: pass a dict of "
                              f"{', '.join(t.name for t in required)}")
        return {required[0].name: x}

    def with_extra_inputs(self, x: np.ndarray, settings: Sequence[str]) -> dict[str, np.ndarray]:
        """``x`` as the required input plus ``NAME=VALUE`` settings broadcast to every sample of the batch."""
        inputs = self.as_inputs(x)
        infos = {t.name: t for t in self.info.inputs}
        for item in settings:
            name, sep, value = item.partition("=")
            if not sep or name not in infos:
                raise ClientError(f"--set {item!r}: expected INPUT=VALUE with INPUT one of {', '.join(infos)}")
            t = infos[name]
            if any(d < 0 for d in t.dims):
                raise ClientError(f"--set {name}: input {name!r} has dynamic axes; send it as a tensor")
            try:
                inputs[name] = np.full((len(x), *t.dims), float(value)).astype(t.dtype)
            except ValueError:
                raise ClientError(f"--set {item!r}: {value!r} is not a number") from None
        return inputs

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """The checks the server runs (``serving.validation``), before sending: the same one-line messages."""
        if self.info.rules is None:
            return
        try:
            check_arrays(self.info.rules, inputs)
        except InputError as e:
            raise ClientError(str(e)) from None

    def _request(self, inputs: dict[str, np.ndarray], class_count: int = 0) -> tuple[list, list]:
        from tritonclient.utils import np_to_triton_dtype

        tc, binary = self._tc, ({"binary_data": True} if self.protocol == "http" else {})
        reqs = []
        for name, a in inputs.items():
            a = np.ascontiguousarray(a)
            r = tc.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            r.set_data_from_numpy(a, **binary)
            reqs.append(r)
        # class_count on a labelled output: the server answers top-k "score:index:label" strings instead.
        outs = [tc.InferRequestedOutput(t.name, **binary,
                                        **({"class_count": class_count} if class_count and t.name in
                                           self.info.labelled else {}))
                for t in self.info.outputs]
        return reqs, outs

    def _result(self, res: Any) -> dict[str, np.ndarray]:
        return {t.name: res.as_numpy(t.name) for t in self.info.outputs}

    def _error(self, e: Exception) -> InferenceError:
        from tritonclient.utils import InferenceServerException

        if isinstance(e, InferenceServerException):
            msg = e.message() or str(e)
            prefix = f"model {self.model!r}: "
            return InferenceError(msg if msg.startswith(prefix) else prefix + msg, e.status())
        return InferenceError(f"model {self.model!r}: {type(e).__name__}: {e}")

    def infer(self, x: np.ndarray | dict[str, np.ndarray], *, validate: bool = True,
              request_id: str = "", class_count: int = 0) -> dict[str, np.ndarray]:
        """One request; returns {output name: array}. ``validate=False`` sends as-is (server-side checks).
        ``class_count=k``: each labelled output comes back as the top-k ``score:index:label`` strings [B, k]."""
        inputs = self.as_inputs(x)
        if validate:
            self.validate(inputs)
        reqs, outs = self._request(inputs, class_count)
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        try:
            res = self._with_retries(lambda: self._client.infer(self.model, reqs, outputs=outs,
                                                                request_id=request_id, **kwargs))
        except Exception as e:
            raise self._error(e) from None
        return self._result(res)

    def infer_many(self, batches: Sequence[np.ndarray | dict[str, np.ndarray]], concurrency: int = 16, *,
                   validate: bool = True, return_errors: bool = False) -> list[dict[str, np.ndarray] | Exception]:
        """Send all ``batches`` with up to ``concurrency`` in flight; results in the order of ``batches``.

        Each request carries its index as request id and each response's id is checked against it, so a
        response can never be matched to the wrong request. gRPC: threads on this (thread-safe) client;
        HTTP: the client's asyncio API (``tritonclient.http.aio``), ``concurrency`` connections; not callable
        from inside a running event loop. With ``return_errors`` a failed request yields its
        ``InferenceError`` instead of raising it."""
        items = [self.as_inputs(b) for b in batches]
        if validate:
            for inputs in items:
                self.validate(inputs)

        def check(i: int, res: Any) -> dict[str, np.ndarray]:
            resp = res.get_response(**({"as_json": True} if self.protocol == "grpc" else {}))
            rid = resp.get("id", "")
            if rid != str(i):
                raise InferenceError(f"model {self.model!r}: response id {rid!r} for request {i}")
            return self._result(res)

        results: list[Any] = [None] * len(items)
        if self.protocol == "grpc":
            def one(i: int) -> Any:
                reqs, outs = self._request(items[i])
                try:
                    return check(i, self._with_retries(lambda: self._client.infer(
                        self.model, reqs, outputs=outs, request_id=str(i), client_timeout=self.timeout)))
                except InferenceError as e:
                    return e
                except Exception as e:
                    return self._error(e)

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                results = list(pool.map(one, range(len(items))))
        else:
            results = asyncio.run(self._http_many(items, concurrency, check))
        if not return_errors:
            for r in results:
                if isinstance(r, Exception):
                    raise r
        return results


# ------------------------------------------------------------------------------------------ images

IMAGE_SUFFIX = "_image"  # the served model that takes encoded files (serving.image_models)
FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def file_batch(files: Sequence[str | Path | bytes]) -> np.ndarray:
    """Encoded image files (paths or their bytes) -> the BYTES tensor ``<model>_image`` takes: object [N, 1]."""
    out = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        if isinstance(f, bytes):
            out[i, 0] = f
            continue
        try:
            out[i, 0] = Path(f).read_bytes()
        except OSError as e:
            raise ClientError(f"{f}: cannot read file ({e.strerror or e})") from None
    return out


def top_k(entries: np.ndarray) -> list[tuple[float, int, str]]:
    """One sample's classification-extension answer (``score:index:label`` strings) as (score, index, label)."""
    out = []
    for e in np.asarray(entries).reshape(-1):
        score, index, label = (e.decode() if isinstance(e, bytes) else str(e)).split(":", 2)
        out.append((float(score), int(index), label))
    return out


def _format_top(name: str, entries: list[tuple[float, int, str]]) -> str:
    return f"{name}: " + ", ".join(f"{label} {score:.3f}" for score, _, label in entries)


def load_image(path: str | Path) -> np.ndarray:
    """A PNG/JPEG (as grayscale in [0, 1]) or .npy file -> float32 [N, 1, H, W]."""
    path = Path(path)
    if not path.exists():
        raise ClientError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        a = np.load(path)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0  # 8-bit pixels, as in a PNG
        elif a.dtype != np.float32:
            raise ClientError(f"{path}: dtype {a.dtype.name}; expected float32 in [0, 1] or uint8 pixels")
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[None] if a.shape[0] == 1 else a[:, None]
        if a.ndim != 4 or a.shape[1] != 1:
            raise ClientError(f"{path}: shape {list(a.shape)}; expected [H, W], [1, H, W], [N, H, W] or [N, 1, H, W]")
        return np.ascontiguousarray(a)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ClientError(f"{path}: not an image file (PNG/JPEG) nor .npy") from None
    return a[None, None]


def describe(outputs: dict[str, np.ndarray], kinds: dict[str, str], i: int) -> dict[str, Any]:
    """Sample ``i`` of a batch's outputs as plain values, each presented by its output kind."""
    return {name: output_kind(kinds.get(name, "tensor")).present(arr[i]) for name, arr in outputs.items()}


def _format(label: str, d: dict[str, Any], kinds: dict[str, str]) -> str:
    return "\n".join([label, *(f"  {output_kind(kinds.get(n, 'tensor')).format(n, v)}" for n, v in d.items())])


def drawn_path(base: Path, item: int, n_items: int, output: str, n_outputs: int) -> Path:
    """Where one drawing goes: ``base`` itself for one image and one output, else ``base`` with the image's
    index and/or the output's name before the suffix (``mask_3.png``, ``maps_scale_weights.png``)."""
    parts = [base.stem, *([str(item)] if n_items > 1 else []), *([output] if n_outputs > 1 else [])]
    return base.with_name("_".join(parts) + (base.suffix or ".png"))


def save_drawings(base: Path, outputs: dict[str, np.ndarray], kinds: dict[str, str], names: list[str],
                  i: int, item: int, n_items: int) -> list[Path]:
    """Draw sample ``i`` of the batch (the CLI's image number ``item``) of each output in ``names`` (its kind's
    ``render``) as a PNG; returns the paths."""
    from PIL import Image

    saved = []
    for name in names:
        rgb = output_kind(kinds.get(name, "tensor")).render(outputs[name][i])
        if rgb is None:
            continue
        path = drawn_path(base, item, n_items, name, len(names))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        saved.append(path)
    return saved


def classify_files(client: Client, files: Sequence[str | Path | bytes], top: int = 5,
                   labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Send encoded files to a ``<model>_image`` client in batches up to its max batch size; per file, each
    labelled output as its top-``top`` (score, index, label) and every other output presented by its kind."""
    mbs = max(client.info.max_batch_size, 1)
    kinds = client.info.output_kinds
    results = []
    for s in range(0, len(files), mbs):
        chunk = files[s:s + mbs]
        outs = client.infer(file_batch(chunk), class_count=top)
        for j in range(len(chunk)):
            r: dict[str, Any] = {}
            for name, arr in outs.items():
                r[name] = top_k(arr[j]) if name in client.info.labelled else \
                    output_kind(kinds.get(name, "tensor")).present(arr[j])
            results.append(r)
    return results


def _classify_files(args: argparse.Namespace, files: list[Path]) -> int:
    name = args.model if args.model.endswith(IMAGE_SUFFIX) else args.model + IMAGE_SUFFIX
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f}: no such file")
    try:
        client = Client(name, args.protocol, args.url, retries=args.retries)
    except ClientError as e:
        if name == args.model or "not reachable" in str(e):
            raise
        raise ClientError(f"{e} (image files go as bytes to {name!r}; --tensor sends them decoded to "
                          f"{args.model!r})") from e
    kinds = client.info.output_kinds
    for f, r in zip(files, classify_files(client, files, args.top_k), strict=True):
        if args.json:
            print(json.dumps({"input": str(f), "model": name, "outputs": r}))
            continue
        lines = [str(f)]
        for out, v in r.items():
            lines.append("  " + (_format_top(out, v) if out in client.info.labelled else
                                 output_kind(kinds.get(out, "tensor")).format(out, v)))
        print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="*", type=Path, help="PNG/JPEG or .npy files")
    p.add_argument("--model", required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 grpc, :8000 http)")
    p.add_argument("--sample", type=int, default=0, help="send N images from the test split instead of files")
    p.add_argument("--side", type=int, default=64, help="canvas side of --sample images")
    p.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE",
                   help="a value for another input, the same for every image (e.g. --set target=3)")
    p.add_argument("--save-mask", type=Path, metavar="PNG",
                   help="write each segmentation output as a colour mask PNG (index/output name added for several)")
    p.add_argument("--save-maps", type=Path, metavar="PNG",
                   help="write each map output (attention, weights, saliency) as heat-map PNGs")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per class output for image files")
    p.add_argument("--tensor", action="store_true",
                   help="send image files as decoded tensors to MODEL itself, not their bytes to MODEL_image")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--retries", type=int, default=RetryPolicy.retries,
                   help="tries again this often while the server or model restarts (backoff 0.5 s doubling "
                        "to 8 s; 0: fail at once)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        if not args.images and not args.sample:
            raise ClientError("give image files or --sample N")
        files = [f for f in args.images if f.suffix.lower() in FILE_SUFFIXES]
        if files and not args.tensor:
            if len(files) != len(args.images) or args.sample:
                raise ClientError("image files go to MODEL_image as bytes: send .npy tensors or --sample in "
                                  "another call (or pass --tensor)")
            return _classify_files(args, files)
        client = Client(args.model, args.protocol, args.url, retries=args.retries)
        items: list[tuple[str, np.ndarray]] = []  # (label, [1, 1, H, W])
        if args.sample:
            from training.data import test_images

            images, labels = test_images(args.sample, canvas=args.side)
            items += [(f"sample {i} (label {int(labels[i])})", images[i:i + 1]) for i in range(len(images))]
        for path in args.images:
            arr = load_image(path)
            items += [(f"{path}" + (f"[{j}]" if len(arr) > 1 else ""), arr[j:j + 1]) for j in range(len(arr))]
        # Same-sized images go together, up to the model's max batch size.
        mbs = max(client.info.max_batch_size, 1)
        by_shape: dict[tuple, list[int]] = {}
        for k, (_, a) in enumerate(items):
            by_shape.setdefault(a.shape, []).append(k)
        results: dict[int, dict[str, Any]] = {}
        kinds = client.info.output_kinds
        drawn = {flag: [n for n, kind in kinds.items() if kind in want] for flag, want in
                 (("save_mask", ("segmentation",)), ("save_maps", ("map", "saliency")))}
        for flag, names in drawn.items():
            if getattr(args, flag) is not None and not names:
                raise ClientError(f"model {args.model!r} has no output to draw for --{flag.replace('_', '-')} "
                                  f"(its outputs: {', '.join(f'{n} ({k})' for n, k in kinds.items())})")
        saved: dict[int, list[Path]] = {}
        for ks in by_shape.values():
            for s in range(0, len(ks), mbs):
                chunk = ks[s:s + mbs]
                outs = client.infer(client.with_extra_inputs(np.concatenate([items[k][1] for k in chunk]), args.set))
                for j, k in enumerate(chunk):
                    results[k] = describe(outs, kinds, j)
                    for flag, names in drawn.items():
                        if getattr(args, flag) is not None:
                            saved.setdefault(k, []).extend(
                                save_drawings(getattr(args, flag), outs, kinds, names, j, k, len(items)))
        for k, (label, _) in enumerate(items):
            files = [str(f) for f in saved.get(k, [])]
            if args.json:
                print(json.dumps({"input": label, "model": args.model, "outputs": results[k],
                                  **({"saved": files} if files else {})}))
            else:
                print(_format(label, results[k], kinds) + "".join(f"\n  saved {f}" for f in files))
    except Exception as e:
        return cli_error(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
