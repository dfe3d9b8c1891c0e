"""Where each stage reads and writes. Overridable by environment for tests and CI."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tracked: the shipped trained weights, their metrics and fingerprints (what `make export` reuses).
WEIGHTS_DIR = Path(os.environ.get("ATTNZOO_WEIGHTS", REPO_ROOT / "training" / "weights"))
# Untracked build outputs: custom-op graphs, FP16 graphs, engines.
ARTIFACTS_DIR = Path(os.environ.get("ATTNZOO_ARTIFACTS", REPO_ROOT / "artifacts"))
REPOSITORY_DIR = Path(os.environ.get("ATTNZOO_REPOSITORY", REPO_ROOT / "model_repository"))
# Untracked: models a user trained on their own image trees (spec, weights and record per model).
USER_MODELS_DIR = Path(os.environ.get("ATTNZOO_USER_MODELS", REPO_ROOT / "user_models"))
REPORTS_DIR = Path(os.environ.get("ATTNZOO_REPORTS", REPO_ROOT / "reports"))
