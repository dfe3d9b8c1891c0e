# Two commands do everything on a fresh machine: `make export` then `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODELS ?= all
ARCHS ?= sm86

.PHONY: install browser gallery train export repository engines fp16-report int8 int8-report variants variants-served pipeline-bench serve frontdoor bench bench-images bench-export test test-fast lint gpu-check clean samples reliability study

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) browser

# The explorer's browser test (tests/test_explorer.py) drives Debian's chromium: installed where we may (root with
# apt-get); elsewhere that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium + chromium-driver (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null) || echo "warning: apt-get could not install chromium" >&2; fi

train: $(STAMP)
	$(PY) -m training $(MODELS)

# Train what is missing, export, check, parity-gate, then generate the Triton repository.
export: $(STAMP)
	$(PY) -m export $(MODELS)
	$(PY) -m serving.repository --target cpu

repository: $(STAMP)
	$(PY) -m serving.repository --target cpu

engines: $(STAMP)
	$(PY) -m export.engines $(MODELS) --archs $(ARCHS)

fp16-report: $(STAMP)
	$(PY) -m export.fp16 $(MODELS) --probe --sweep

# INT8 QDQ graphs with the recorded choices (export/int8/choices.json), gated: reports/int8.{md,json,png}.
int8: $(STAMP)
	$(PY) -m export.int8 $(MODELS)

# Re-measure the choices (calibration method, nodes kept float), time int8 vs fp32, build TensorRT-RTX engines;
# one process per model so that a shared host's lock can be taken model by model. Then the int8 conv speed-up by
# channel width against each model's layer widths (reports/int8_roofline.{md,json,png}).
int8-report: $(STAMP)
	rc=0; for m in $$($(PY) -c "from training.registry import resolve_names; print(*resolve_names('$(MODELS)'.split()))"); do \
		$(PY) -m export.int8 $$m --probe --bench --tensorrt || rc=1; done; \
	$(PY) -m export.int8.roofline $(MODELS) || rc=1; exit $$rc

# The fastest variant (fp32, fp16, int8) per model that passed its gate: reports/variants.{md,json,png}.
variants: $(STAMP)
	$(PY) -m export.variants $(MODELS)

# The served variants (<name>, <name>_int8) over gRPC at concurrency 1 and 16 (reports/variants_served.md).
variants-served: $(STAMP)
	$(PY) -m serving.variant_bench $(MODELS)

# Composed models served as an ensemble and as BLS, with Triton's per-step statistics (reports/pipeline_<name>.md).
pipeline-bench: $(STAMP)
	$(PY) -m serving.pipeline_bench $(MODELS)

serve: $(STAMP)
	$(PY) -m serving.server

# The validating HTTP front door (port 8080) in front of `make serve`'s gRPC port: the port to expose.
frontdoor: $(STAMP)
	$(PY) -m serving.frontdoor

bench: $(STAMP)
	$(PY) -m serving.bench

# Raw image files: the preprocessing step and <name>_image end to end (reports/images.md).
bench-images: $(STAMP)
	$(PY) -m serving.image_bench $(if $(filter-out all,$(MODELS)),$(MODELS),cnn)

bench-export: $(STAMP)
	$(PY) -m export.speed $(MODELS)

gpu-check: $(STAMP)
	$(PY) -m export.gpu_check all

# pytest's exit 5 (no tests collected) must fail loudly, never pass.
test: $(STAMP) browser
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not server"

lint: $(STAMP)
	$(VENV)/bin/ruff check training export serving tests

# The same 8 images through every mechanism, every map/box/mask output drawn: reports/gallery.{png,md}.
gallery: $(STAMP)
	$(PY) -m serving.gallery

samples: $(STAMP)
	$(PY) -c "from training.data import save_sample_grid; save_sample_grid('reports/samples.png')"

clean:
	rm -rf artifacts model_repository/*/ reports/*.json

reliability: $(STAMP)
	$(PY) -m serving.reliability

# A measured claim (seeded comparison of variants): `make study STUDY=attention` (or residual_attention, macnn,
# attention_to_scale); not part of `make export`.
STUDY ?= attention
study: $(STAMP)
	$(PY) -m training.studies $(STUDY)
