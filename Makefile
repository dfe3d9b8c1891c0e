# Two commands do everything on a fresh machine: `make export` then `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The one command line (serving/cli.py, a console script); the `python -m` forms stay as aliases.
ATTNZOO := $(VENV)/bin/attnzoo
STAMP := $(VENV)/.installed-stamp
MODELS ?= all
ARCHS ?= sm86

.PHONY: install browser gallery train export repository served-threads engines fp16-report int8 int8-report variants variants-served pipeline-bench serve frontdoor bench bench-images bench-export test test-fast lint gpu-check clean samples reliability study

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
	$(ATTNZOO) train $(MODELS)

# Data-parallel training on this host: torchrun + DistributedDataParallel (gloo on CPU, NCCL on GPU), NPROC
# processes, the recipe's global batch split over them (docs/training.md: multi-node, elastic restarts, GPUs).
# Weights go to DDP_WEIGHTS, so that the shipped single-process weights (training/weights/) stay as they are.
NPROC ?= 2
DDP_WEIGHTS ?= artifacts/weights-ddp
.PHONY: train-ddp
train-ddp: $(STAMP)
	GLOO_SOCKET_IFNAME=$${GLOO_SOCKET_IFNAME:-lo} ATTNZOO_WEIGHTS=$(DDP_WEIGHTS) $(VENV)/bin/torchrun --standalone \
		--nproc-per-node $(NPROC) -m training $(MODELS)

# Train what is missing, export, check, parity-gate, then generate the Triton repository.
export: $(STAMP)
	$(ATTNZOO) export $(MODELS)
	$(ATTNZOO) repository --target cpu --variant $(VARIANT)

# VARIANT=host: each model's CPU engine (onnxruntime, OpenVINO) and threading chosen by measurement on this host,
# its int8 model served only where faster here (export.host_choice, cached per instruction set in
# artifacts/host_choice/; recorded in each model's export.json). VARIANT=fp32: onnxruntime fp32, spin-wait off.
VARIANT ?= host
repository: $(STAMP)
	$(ATTNZOO) repository --target cpu --variant $(VARIANT)

# Spin-wait and instance count chosen by served measurement (reports/served_threads.md), recorded for this host's
# instruction set; `make repository` applies it.
served-threads: $(STAMP)
	$(PY) -m bench.served_threads

# Each model's served config (engine, shapes, spin-wait, instances) against the default, served side by side
# (reports/served_engine.md).
.PHONY: served-engine
served-engine: $(STAMP)
	$(PY) -m bench.served_engine

engines: $(STAMP)
	$(ATTNZOO) engines $(MODELS) --archs $(ARCHS)

fp16-report: $(STAMP)
	$(ATTNZOO) fp16 $(MODELS) --probe --sweep

# INT8 QDQ graphs with the recorded choices (export/int8/choices.json), gated: reports/int8.{md,json,png}.
int8: $(STAMP)
	$(ATTNZOO) int8 $(MODELS)

# Re-measure the choices (calibration method, nodes kept float), time int8 vs fp32, build TensorRT-RTX engines;
# one process per model so that a shared host's lock can be taken model by model. Then the int8 conv speed-up by
# channel width against each model's layer widths (reports/int8_roofline.{md,json,png}).
int8-report: $(STAMP)
	rc=0; for m in $$($(PY) -c "from training.registry import resolve_names; print(*resolve_names('$(MODELS)'.split()))"); do \
		$(PY) -m export.int8 $$m --probe --tensorrt || rc=1; $(PY) -m bench.int8 $$m || rc=1; done; \
	$(PY) -m bench.int8_roofline $(MODELS) || rc=1; exit $$rc

# The fastest variant (fp32, fp16, int8) per model that passed its gate: reports/variants.{md,json,png}.
variants: $(STAMP)
	$(ATTNZOO) variants $(MODELS)

# The served variants (<name>, <name>_int8) over gRPC at concurrency 1 and 16 (reports/variants_served.md).
variants-served: $(STAMP)
	$(ATTNZOO) variants-served $(MODELS)

# Composed models served as an ensemble and as BLS, with Triton's per-step statistics (reports/pipeline_<name>.md).
pipeline-bench: $(STAMP)
	$(ATTNZOO) pipeline-bench $(MODELS)

# The served stack: the front door (KServe v2 HTTP on 8000, gRPC on 8001: the only ports for clients) in front of a
# private, supervised tritonserver (a unix socket only this user reaches); metrics on 127.0.0.1:8002.
# REPLICAS=N (N >= 2): N private replicas behind Envoy (on a unix socket too; docs/scaleout.md), Prometheus on
# 127.0.0.1:9090 where installed; REPOSITORY may be s3://host:port/bucket/path.
REPLICAS ?= 1
serve: $(STAMP) $(if $(filter-out 1,$(REPLICAS)),prometheus)
	$(ATTNZOO) serve --replicas $(REPLICAS) $(if $(REPOSITORY),--repo $(REPOSITORY))

.PHONY: scaleout-bench
# Envoy's added latency (c=1) and throughput (c=16) vs one replica direct, faults with/without retries:
# reports/scaleout.{md,json}.
scaleout-bench: $(STAMP)
	$(PY) -m bench.scaleout

# The validating HTTP front door alone (port 8080), in front of any Triton gRPC URL (--triton-grpc), e.g. Envoy's.
# (`make serve` runs its own front door on 8000/8001 in front of a private tritonserver.)
frontdoor: $(STAMP)
	$(ATTNZOO) frontdoor

bench: $(STAMP)
	$(ATTNZOO) bench

# Raw image files: the preprocessing step and <name>_image end to end (reports/images.md).
bench-images: $(STAMP)
	$(ATTNZOO) bench-images $(if $(filter-out all,$(MODELS)),$(MODELS),cnn)

# onnxruntime vs torch eager with a per-op profile (reports/ort_vs_torch.md), then the peer table below.
bench-export: $(STAMP) bench-peers
	$(ATTNZOO) bench-export $(MODELS)

# The served engine (this host's choice) vs OpenVINO static, torch eager and torch.compile, batch 1 and 32, two runs,
# a verdict per model, one section per host ISA (reports/peers.{md,json}); EMULATE_AVX2=1 adds a run held to AVX2
# (bench.cpuid_mask where the host can fault on CPUID, else ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA). Any target runs
# held, as on an AVX2-only host: `.venv/bin/python -m bench.cpuid_mask -- make <target>`.
.PHONY: bench-peers host-choice
bench-peers: $(STAMP)
	$(PY) -m bench.peers $(MODELS) $(if $(EMULATE_AVX2),--emulate-avx2)

# Per-host engine/precision/threading choice, gated and timed here: artifacts/host_choice/<isa key>.json.
host-choice: $(STAMP)
	$(PY) -m export.host_choice $(MODELS)

gpu-check: $(STAMP)
	$(ATTNZOO) gpu-check all

# pytest's exit 5 (no tests collected) must fail loudly, never pass.
test: $(STAMP) browser
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not server"

lint: $(STAMP)
	$(VENV)/bin/ruff check training export serving bench tests

# The same 8 images through every mechanism, every map/box/mask output drawn: reports/gallery.{png,md}.
gallery: $(STAMP)
	$(ATTNZOO) gallery

samples: $(STAMP)
	$(PY) -c "from training.data import save_sample_grid; save_sample_grid('reports/samples.png')"

clean:
	rm -rf artifacts model_repository/*/ reports/*.json

reliability: $(STAMP)
	$(ATTNZOO) reliability

# A measured claim (seeded comparison of variants): `make study STUDY=attention` (or residual_attention, macnn,
# attention_to_scale); not part of `make export`.
STUDY ?= attention
study: $(STAMP)
	$(ATTNZOO) study $(STUDY)

# Kubernetes/KServe manifests, Containerfiles and Prometheus rules under deploy/, generated from the specs
# (serving/k8s.py); tests/test_manifests.py fails when the committed tree differs from what this writes.
.PHONY: manifests prometheus
manifests: $(STAMP)
	$(PY) -m serving.k8s

# promtool (Debian's prometheus package) tests deploy/prometheus/rules.yml; installed where we may (root with
# apt-get); elsewhere tests/test_prometheus_rules.py skips and says why.
prometheus:
	@if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing prometheus (apt-get: promtool)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null) || echo "warning: apt-get could not install prometheus" >&2; fi
install: prometheus
test: prometheus
