"""The export-time rewrites by name (``ExportOptions.rewriters``): which methods each patches onto which module
class, when it applies (a module it rewrites is in the model: never by model name) and the opset it needs.

The patched methods are used only inside ``applied`` (an export), so the trained weights and their fingerprint,
which hashes the model modules' code, do not change; the parity gate checks every rewritten graph against the
unrewritten torch model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from export.rewriters.fused_attention import (
    FUSED_ATTENTION,
    MIN_OPSET,
    Attention,
    GeneralizedAttention,
    generalized_centre_attention,
    holds_fusable_attention,
    vit_attention_forward,
)
from export.rewriters.lean_feedback import LEAN_FEEDBACK, FeedbackCNN, holds_feedback, lean_top_down


@dataclass(frozen=True)
class Rewrite:
    """Methods patched onto module classes while exporting, for the models holding such a module."""

    patches: tuple[tuple[type, str, Callable], ...]  # (class, method, replacement)
    applies: Callable[[nn.Module], bool]  # whether it changes this module's graph
    min_opset: int = 0


REWRITES: dict[str, Rewrite] = {
    FUSED_ATTENTION: Rewrite(((Attention, "forward", vit_attention_forward),
                              (GeneralizedAttention, "centre_attention", generalized_centre_attention)),
                             holds_fusable_attention, MIN_OPSET),
    LEAN_FEEDBACK: Rewrite(((FeedbackCNN, "top_down", lean_top_down),), holds_feedback),
}
_ORIGINAL: dict[tuple[type, str], Callable] = {
    (cls, method): getattr(cls, method) for r in REWRITES.values() for cls, method, _ in r.patches
}


def plan(names: tuple[str, ...], module: nn.Module, opset: int) -> tuple[tuple[str, ...], int]:
    """(the named rewrites that change ``module``'s graph, the opset the graph is exported at: the spec's,
    raised to what those rewrites need)."""
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise ValueError(f"unknown export rewriters {unknown}; known: {sorted(REWRITES)}")
    active = tuple(n for n in names if REWRITES[n].applies(module))
    return active, max([opset, *(REWRITES[n].min_opset for n in active)])


@contextlib.contextmanager
def applied(names: tuple[str, ...]) -> Iterator[None]:
    """Patch the named rewrites onto their classes for the ``with`` body (an export), then restore them."""
    patches = [p for n in names for p in REWRITES[n].patches]
    try:
        for cls, method, fn in patches:
            setattr(cls, method, fn)
        yield
    finally:
        for cls, method, _ in patches:
            setattr(cls, method, _ORIGINAL[cls, method])
