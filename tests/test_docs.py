"""The README and docs/ stay true to the tree: every relative link resolves (file and heading), the README stays
short, and every `make` target, `python -m` module and `attnzoo` command they show exists. Static: nothing runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from serving.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 10 * 1024
PROJECT = ("training", "export", "serving", "bench")

# Pages the README links to that concurrent work adds (named, not skipped silently): an entry whose file exists is
# an error too, so the list empties as they land.
PENDING_PAGES: frozenset[str] = frozenset()

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def code_of(text: str) -> list[str]:
    """Fenced blocks and inline code spans: where commands are shown (prose may say "make" as a verb)."""
    blocks = FENCE.findall(text)
    return blocks + INLINE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", FENCE.sub("", md.read_text()), re.M)}


def links() -> list[tuple[Path, str]]:
    return [(doc, target) for doc in DOCS for target in LINK.findall(FENCE.sub("", doc.read_text()))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not ours to check


def test_the_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail to docs/"


def test_every_relative_link_resolves():
    bad, pending = [], set()
    for doc, target in links():
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            if dest.is_relative_to(ROOT) and rel(dest) in PENDING_PAGES:
                pending.add(rel(dest))
                continue
            bad.append(f"{rel(doc)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{rel(doc)}: {target} (no heading #{anchor} in {rel(dest)})")
    assert not bad, "broken links:\n" + "\n".join(bad)
    landed = {p for p in PENDING_PAGES if (ROOT / p).exists()}
    assert not landed, f"PENDING_PAGES lists pages that exist now (remove them): {sorted(landed)}"


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))


def mentions(pattern: str) -> list[tuple[str, str]]:
    rx = re.compile(pattern)
    return sorted({(rel(doc), m) for doc in DOCS for code in code_of(doc.read_text()) for m in rx.findall(code)})


def test_every_make_target_shown_exists():
    shown = mentions(r"(?:^|[\s;(&|])make ([a-z][\w-]*)")
    assert shown, "no `make` command found in the docs: the pattern is wrong"
    missing = [f"{doc}: make {t}" for doc, t in shown if t not in make_targets()]
    assert not missing, "make targets the docs show but the Makefile lacks:\n" + "\n".join(missing)


def runnable(module: str) -> bool:
    """``python -m module`` works: a project module with a ``__main__`` guard (or a package with __main__.py), or
    an installed module (pytest, pip, ...)."""
    if module.split(".")[0] not in PROJECT:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    base = ROOT.joinpath(*module.split("."))
    if (base / "__main__.py").is_file():
        return True
    py = base.with_suffix(".py")
    return py.is_file() and re.search(r"^if __name__ == .__main__.:", py.read_text(), re.M) is not None


def test_every_python_m_module_shown_is_runnable():
    shown = mentions(r"python3? -m ([\w.]+)")
    assert any(m.startswith("serving.") for _, m in shown), "no `python -m serving...` found: the pattern is wrong"
    missing = [f"{doc}: python -m {m}" for doc, m in shown if not runnable(m)]
    assert not missing, "modules the docs run that have no main:\n" + "\n".join(missing)


def test_every_attnzoo_command_shown_exists():
    shown = mentions(r"(?:^|[\s;(&|`])attnzoo ([a-z][\w-]*)")
    assert shown, "no `attnzoo` command found in the docs: the pattern is wrong"
    missing = [f"{doc}: attnzoo {c}" for doc, c in shown if c not in COMMANDS]
    assert not missing, "attnzoo commands the docs show that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("recipe", ["ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make test"])
def test_the_readme_keeps_the_two_commands_and_the_avx2_recipe(recipe):
    text = (ROOT / "README.md").read_text()
    assert "make export" in text and "make test" in text and recipe in text
