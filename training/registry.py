"""The registry of model specs (timm's ``@register_model`` habit): the zoo's families register theirs when
``training.models`` is imported, and every model derived for a user's images (``user_models/*.spec.json``,
``training.derived``) is registered beside them on first lookup.

The spec dataclasses live in ``training.specs`` and are re-exported here, so that ``from training.registry import
ModelSpec, register_model`` keeps working. torch is not imported here: the client and the repository generator
read specs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.specs import (
    SIDE,
    BarsFn,
    Checks,
    Composition,
    Dim,
    ExportOptions,
    GraphSpec,
    LossFn,
    MetricsFn,
    ModelSpec,
    ServingOptions,
    Stage,
    Step,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SIDE", "BarsFn", "Checks", "Composition", "Dim", "ExportOptions", "GraphSpec", "LossFn", "MetricsFn",
           "ModelSpec", "ServingOptions", "Stage", "Step", "TensorSpec", "TrainRecipe", "UnknownModelError",
           "class_logits", "create_model", "get_spec", "image_input", "list_models", "register_model",
           "resolve_names"]

_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; users want a plain line
        return str(self.args[0])


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add ``spec`` under its name; a second spec of the same name is an error unless ``replace`` (a user model
    retrained on its tree replaces its earlier spec)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


_USER_SPECS_LOADED: set[str] = set()


def mark_user_spec_loaded(path: str) -> None:
    """Record that the user spec file ``path`` is registered (a model written and registered in this process),
    so that the next lookup does not load it again."""
    _USER_SPECS_LOADED.add(str(path))


def _ensure_models_imported() -> None:
    # Importing the package runs every family file's register_model calls (and imports torch).
    import training.models  # noqa: F401

    _register_user_models()


def _register_user_models() -> None:
    """Register every model derived for a user's images (``user_models/*.spec.json``, training.derived)."""
    import json
    import sys

    from training.derived import DerivationError, derive_spec, user_spec_files

    for path in user_spec_files():
        if str(path) in _USER_SPECS_LOADED:
            continue
        _USER_SPECS_LOADED.add(str(path))
        try:
            info = json.loads(path.read_text())
            if info["name"] in _REGISTRY:
                raise DerivationError(f"name {info['name']!r} is already a registered model")
            if info["base"] not in _REGISTRY:
                raise DerivationError(f"base model {info['base']!r} is not registered")
            register_model(derive_spec(_REGISTRY[info["base"]], info))
        except (ValueError, KeyError, OSError) as e:  # one bad file must not hide the zoo
            print(f"warning: {path}: skipped: {e}", file=sys.stderr)


def get_spec(name: str) -> ModelSpec:
    _ensure_models_imported()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def resolve_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """CLI model arguments -> registered names: ``all`` (or nothing) means every model; an unknown name raises
    ``UnknownModelError`` naming the known ones."""
    if not names or list(names) == ["all"]:
        return list_models()
    return [get_spec(n).name for n in names]


def list_models(family: str | None = None) -> list[str]:
    _ensure_models_imported()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``create_model``: the spec's builder, with overrides such as ``in_chans``/``num_classes``."""
    return get_spec(name).builder(**kwargs)
