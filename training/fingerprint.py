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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_fingerprint() -> dict[str, Any]:
    """The CPU model and library versions that make training bit-reproducible when they are equal."""
    libs = {}
    for pkg in ("torch", "numpy", "scikit-learn", "pillow"):
        try:
            libs[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            libs[pkg] = None
    import torch

    # The thread count too: the same code and seed trained with 1 intra-op thread instead of 2 gave other
    # weights (measured: cnn 97.15% instead of 97.35% test accuracy).
    return {"cpu": _cpu_model(), "machine": platform.machine(), "python": platform.python_version(), **libs,
            "torch_threads": torch.get_num_threads()}
