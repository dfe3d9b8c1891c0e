"""What trained weights depend on, as a short hash: recipe values, the loss and the model's code.

Code is hashed as its syntax tree with docstrings removed (``ast.dump`` keeps no line numbers and no
comments), so editing a comment or a docstring retrains nothing while editing a layer retrains the models
built from it. The host fingerprint records where weights were trained: training is bit-reproducible on
one CPU model with the same libraries, not across them.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import sys
import textwrap
from collections.abc import Callable
from importlib import metadata
from typing import Any

from training.registry import ModelSpec

MODEL_PACKAGES = ("training.models", "training.ops")
# Recipe fields added after weights were shipped, with the value every earlier recipe implied.
ADDED_RECIPE_FIELDS = {"data": "digits", "precision": "float32", "channels_last": False, "data_digest": "",
                       "skip_bad_images": False}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(source: str) -> str:
    """The source's syntax tree without docstrings, as text: equal for code that differs only in comments,
    docstrings or layout."""
    return ast.dump(_strip_docstrings(ast.parse(textwrap.dedent(source))))


def model_modules(builder: Callable | None) -> list[str]:
    """The modules a model's weights depend on: the one defining ``builder`` plus every model or op module
    (``training.models.*``, ``training.ops.*``) it imports from, e.g. racnn -> racnn, common, ops.crop_zoom.

    Read from the import statements: an imported custom op (a ``CustomOpDef``) does not name its module."""
    if builder is None:
        return []
    home = inspect.getmodule(builder)
    used = set()
    for node in ast.walk(ast.parse(inspect.getsource(home))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(MODEL_PACKAGES):
            # `from training.ops import crop_zoom` names the submodule training.ops.crop_zoom when there is one
            used |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sys.modules else node.module
                     for a in node.names}
    return [home.__name__, *sorted(used - {home.__name__})]


def function_digest(fn: Callable) -> str:
    """``code_digest`` of a function's definition, found by its qualified name in its module's file as it is
    on disk now. ``inspect.getsource(fn)`` reads the current file at the line numbers the function had when it
    was imported: after an edit above it, a long-running process (a study) would hash the wrong lines."""
    module = sys.modules.get(fn.__module__)
    try:
        nodes: list[ast.AST] = [ast.parse(inspect.getsource(module))] if module else []
    except (OSError, TypeError):
        nodes = []
    for part in fn.__qualname__.split("."):
        nodes = [c for n in nodes for c in ast.iter_child_nodes(n)
                 if isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and c.name == part]
    if len(nodes) != 1:  # a lambda or a nested function: its own source text
        return code_digest(inspect.getsource(fn))
    return ast.dump(_strip_docstrings(ast.Module(body=nodes, type_ignores=[])))


def _loss_source(spec: ModelSpec) -> str:
    return function_digest(spec.train.loss or type(spec.task).loss)


def _describe(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return value


def weights_fingerprint(spec: ModelSpec, steps: int | None = None, train_size: int | None = None,
                        test_size: int | None = None) -> str:
    """Hash of everything the trained weights depend on (see the module docstring)."""
    r = dataclasses.replace(spec.train, **{k: v for k, v in
                                            {"steps": steps, "train_size": train_size, "test_size": test_size}.items()
                                            if v is not None})
    values = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("loss", "metrics", "stages")}
    # At their defaults, fields added later leave the weights trained before they existed current.
    for k, default in ADDED_RECIPE_FIELDS.items():
        if values.get(k) == default:
            del values[k]
    if r.stages:  # callables by name: their code is in the model modules hashed below
        values["stages"] = [{f.name: _describe(getattr(st, f.name)) for f in dataclasses.fields(st)}
                            for st in r.stages]
    # The task's own training settings (e.g. label smoothing), not its bars.
    task = {f.name: getattr(spec.task, f.name) for f in dataclasses.fields(spec.task) if not f.name.startswith("min_")}
    # The builder's bound arguments (e.g. the non-local mode of ``lambda m="dot": ...``) tell apart models
    # built by the same code; the name ties the weights to the one model they are for.
    builder_args = (getattr(spec.builder, "__defaults__", None), getattr(spec.builder, "__kwdefaults__", None))
    parts = [spec.name, repr(builder_args), json.dumps(values, sort_keys=True),
             json.dumps(task, sort_keys=True, default=str), type(spec.task).__name__, _loss_source(spec)]
    parts += [code_digest(inspect.getsource(sys.modules[m])) for m in model_modules(spec.builder)]
    if r.data != ADDED_RECIPE_FIELDS["data"]:  # a newer source's code (the first one's weights predate this)
        import training.data

        parts.append(code_digest(inspect.getsource(training.data)))
    from training import images, userdata

    if userdata.is_user_source(r.data):  # a user tree: its content (data_digest) and loader, not where it lies
        parts[2] = json.dumps({**values, "data": userdata.parse_source(r.data)[0]}, sort_keys=True)
        parts += [code_digest(inspect.getsource(m)) for m in (userdata, images)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# CPU flags that select other kernels in torch/oneDNN/onnxruntime (the model name does not: "AMD EPYC" names
# both AVX2-only and AVX-512 hosts of this kind).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_int8", "amx_bf16")
# Environment variables that hold torch and oneDNN (CPUID_MASK: every library, bench.cpuid_mask) to a lower
# instruction set than the CPU has.
ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CPUID_MASK")
# The record fields that decide whether two hosts compute bit-identical weights; a record lacking any of them
# (written before they existed) is never "the same host".
NUMERICS_KEYS = ("cpu", "machine", "cpu_capability", "cpu_flags", "isa_limits", "python", "torch", "numpy",
                 "scikit-learn", "pillow", "torch_threads")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for this CPU (empty where there is none to read)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_kernel_flags() -> list[str]:
    """The instruction-set flags of ``KERNEL_FLAGS`` this CPU has (what it has, not what torch is held to)."""
    flags = cpu_flags()
    return [f for f in KERNEL_FLAGS if f in flags]


def cpu_capability() -> str:
    """The instruction set torch dispatches its CPU kernels to (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def isa_summary() -> str:
    """One line for report headers, from ``host_fingerprint()``: the CPU, the flags it has and the set torch
    uses, with any limit set."""
    h = host_fingerprint()
    limits = ", ".join(f"{k}={v}" for k, v in h["isa_limits"].items())
    return (f"{h['cpu']} ({h['machine']}), torch kernels {h['cpu_capability']}, CPU flags "
            f"{' '.join(h['cpu_flags']) or 'none'}" + (f", held by {limits}" if limits else ""))


def isa_limits() -> dict[str, str]:
    return {k: os.environ[k] for k in ISA_LIMIT_VARS if os.environ.get(k)}


def library_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Each installed package's version; None where it is not installed."""
    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def host_fingerprint() -> dict[str, Any]:
    """What makes training bit-reproducible when it is equal: the CPU and the kernels torch picks on it (the
    dispatched instruction set, the CPU's kernel-selecting flags, any limit put on them), the thread count and
    the library versions."""
    libs = library_versions(("torch", "numpy", "scikit-learn", "pillow", "onnxruntime"))
    import torch

    # The thread count too: the same code and seed trained with 1 intra-op thread instead of 2 gave other
    # weights (measured: cnn 97.15% instead of 97.35% test accuracy).
    return {"cpu": _cpu_model(), "machine": platform.machine(), "cpu_capability": cpu_capability(),
            "cpu_flags": cpu_kernel_flags(), "isa_limits": isa_limits(), "python": platform.python_version(),
            **libs, "torch_threads": torch.get_num_threads()}


def same_numerics_host(recorded: dict[str, Any], here: dict[str, Any] | None = None) -> bool:
    """Whether weights trained on the ``recorded`` host are reproduced bit for bit here: every
    ``NUMERICS_KEYS`` field present in both and equal. A record without them is another host."""
    here = host_fingerprint() if here is None else here
    return all(k in recorded and k in here and recorded[k] == here[k] for k in NUMERICS_KEYS)
