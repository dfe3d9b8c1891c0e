"""Kubernetes (kustomize) and KServe manifests for this stack, generated from the model specs.

What a pod needs is read from the registered specs through the same helpers that write ``model_repository/``
(``serving.repository.deployables``, ``serving.image_models``): how many python-backend stubs each target runs
(memory, ``/dev/shm``), the largest request a model accepts (``/dev/shm``), how many models load at start
(the startup probe's budget) and the dynamic batcher's settings (the autoscaling targets). Ports are the
serving commands' own defaults. No model is named here.

Written (``deploy/``, committed; ``--check`` fails when a file differs from what would be written):

- ``k8s/base``: a Deployment whose pod runs tritonserver (HTTP/gRPC on 127.0.0.1 only; metrics on the pod IP for
  Prometheus) and the validating front door (``python -m serving.frontdoor``, the only port a Service exposes);
  an HPA (autoscaling/v2) on the recording rules of ``deploy/prometheus/rules.yml``; a PodDisruptionBudget; a
  NetworkPolicy; ``/dev/shm`` as a memory emptyDir sized from the specs.
- ``k8s/overlays/cpu``: the project's CPU image (pip's tritonserver 2.51, python backend + onnxruntime, as served
  here). ``k8s/overlays/gpu``: an image built on NVIDIA's ``tritonserver:<tag>-py3``, ``nvidia.com/gpu``, and an
  init container that builds TensorRT engines for the pod's GPU (``python -m export.engines``) and regenerates the
  repository for the native backends (``python -m serving.repository --target gpu``).
- ``kserve/``: a ServingRuntime (v2 and grpc-v2), an InferenceService with ``storageUri: s3://...`` and the front
  door as its transformer, the S3 Secret (KServe's ``serving.kserve.io/s3-*`` annotations) and its ServiceAccount.
- ``containers/Containerfile.{cpu,gpu}`` (written, not built here: no registry can be reached).
- ``prometheus/rules.yml``: recording rules for the autoscaling signals (request-weighted queue time, pending
  requests, per replica) and alert rules; ``rules_test.yml``: their ``promtool test rules`` cases, beside NVIDIA's
  k8s-onprem rule (``reference/``) that under-reports (server#8979); ``adapter.yaml``: prometheus-adapter rules that
  publish the recorded signals to the HPA.
- ``schemas/``: KServe's CRD schemas, vendored with ``--vendor-crd`` (the tests validate against them).

    python -m serving.k8s [--out deploy] [--check]
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serving.cli import cli_error

APP = "attention-zoo"
TRITON_IMAGE_TAG = "24.10"  # NVIDIA's release of tritonserver 2.51: the version pip's wheel runs here
NVIDIA_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-py3"
IMAGE = {"cpu": f"localhost/{APP}-cpu", "gpu": f"localhost/{APP}-gpu"}  # Containerfile.<target>, built by the user
MODELS_DIR = "/models"  # the pod's repository (an emptyDir the init container fills)
BAKED_REPOSITORY = "/opt/attnzoo/model_repository"  # where the images carry the generated repository
SHM_DEFAULT_MIB = 1  # the python backend's shm-default-byte-size: one region per stub (triton python_backend README)
# Memory, measured here with serving.server.TritonServer.rss_bytes (2026-12-06, pip tritonserver 2.51): 112 MiB
# with one python stub, 385 MiB with four, so ~91 MiB a stub and ~21 MiB for the server; rounded up below.
SERVER_MIB, STUB_MIB, FRONTDOOR_MIB = 256, 128, 256
MODEL_LOAD_S = 3  # startup budget per model (the 4-model run above was ready in a few seconds on 2 cores)
QUEUE_TARGET_FACTOR = 4  # HPA: scale out once requests wait this many times the batcher's own max queue delay
ADMIN_SECRET = f"{APP}-triton-admin"
S3_SECRET = f"{APP}-s3"
SIGNALS = {  # prometheus-adapter's names for the recorded series (deploy/prometheus/rules.yml)
    "queue": ("attnzoo_queue_us_per_request", "attnzoo:queue_us_per_request:rate1m"),
    "pending": ("attnzoo_pending_requests", "attnzoo:pending_requests:sum"),
}


class ManifestError(RuntimeError):
    """A one-line problem generating or checking the manifests."""


# --------------------------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class Sizing:
    """What the specs say a pod needs."""

    models: int  # Triton models the repository serves (graphs, compositions, image models, the floor)
    stubs: dict[str, int]  # target -> python-backend stub processes (instances of python models)
    largest_request_bytes: int  # inputs + outputs of the largest batch at the largest dynamic sizes
    max_queue_delay_us: int
    max_preferred_batch: int

    def memory_mib(self, target: str) -> int:
        return _round_up(SERVER_MIB + STUB_MIB * self.stubs[target], 256)

    def shm_mib(self, target: str) -> int:
        """One default region per stub, and room for a few of the largest requests in flight at once."""
        need = SHM_DEFAULT_MIB * self.stubs[target] + 4 * self.largest_request_bytes / 2**20
        return _round_up(max(need, 64), 64)

    def startup_s(self) -> int:
        return _round_up(60 + MODEL_LOAD_S * self.models, 30)

    def queue_target_us(self) -> int:
        return QUEUE_TARGET_FACTOR * self.max_queue_delay_us


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def _tensor_bytes(t: Any, batch: int) -> int:
    import numpy as np

    per_sample = math.prod(getattr(a, "max", a) for a in t.axes)  # a Dim at its max, else a fixed size
    return batch * per_sample * np.dtype(t.dtype).itemsize


def sizing(names: list[str] | None = None) -> Sizing:
    """Walk every spec (default: every registered model, plus the floor model) as the repository writer does."""
    from serving.image_models import has_image_models
    from serving.repository import FLOOR_MODEL, deployables, spec_for
    from training.registry import list_models

    specs = [spec_for(n) for n in [*(names if names is not None else list_models()), FLOOR_MODEL]]
    if not specs:
        raise ManifestError("no registered models")
    models, stubs, largest = 0, {"cpu": 0, "gpu": 0}, 0
    for spec in specs:
        n = spec.serving.instance_count
        for d in deployables(spec):
            models += 1
            if d.graph is not None:  # python backend on cpu; onnxruntime_onnx / tensorrt_plan on gpu
                stubs["cpu"] += n
                batch = spec.serving.max_batch_size
                largest = max(largest, sum(_tensor_bytes(t, batch) for t in (*d.inputs, *d.outputs)))
            elif spec.composition is not None and spec.composition.kind != "ensemble":  # the BLS python model
                stubs["cpu"] += n
                stubs["gpu"] += n
        if spec.name != FLOOR_MODEL and has_image_models(spec):  # <name>_image (ensemble) + <name>_preprocess
            models += 2
            stubs["cpu"] += n
            stubs["gpu"] += n
    return Sizing(models, stubs, largest, max(s.serving.max_queue_delay_us for s in specs),
                  max(max(s.serving.preferred_batch_sizes, default=1) for s in specs))


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int
    frontdoor: int


def ports() -> Ports:
    """The serving commands' own defaults (serving.server, serving.frontdoor)."""
    from serving.frontdoor import DEFAULT_PORT
    from serving.server import TritonServer

    p = inspect.signature(TritonServer).parameters
    return Ports(p["http_port"].default, p["grpc_port"].default, p["metrics_port"].default, DEFAULT_PORT)


# ---------------------------------------------------------------------------------------- the pod


LABELS = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "inference"}
RESTRICTED = {  # the container securityContext every container gets (Pod Security Standards "restricted")
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def triton_args(p: Ports) -> list[str]:
    """tritonserver's flags, the choices serving.server.TritonServer.command makes on a host, for a pod: explicit
    model control so that one model failing to load does not take the others down, the admin APIs locked with a
    key from a Secret (Kubernetes expands ``$(VAR)``), HTTP and gRPC on loopback (only the front door calls them),
    metrics on the pod IP (Prometheus scrapes them)."""
    from serving import admin
    from serving.server import EXIT_TIMEOUT_S

    return [
        f"--model-repository={MODELS_DIR}",
        "--backend-directory=$(TRITON_BACKEND_DIRECTORY)",
        "--http-address=127.0.0.1", f"--http-port={p.http}",
        "--grpc-address=127.0.0.1", f"--grpc-port={p.grpc}",
        "--metrics-address=0.0.0.0", f"--metrics-port={p.metrics}",
        "--allow-gpu-metrics=$(TRITON_GPU_METRICS)",
        "--model-control-mode=explicit", "--load-model=*",
        "--exit-on-error=false", "--strict-readiness=false",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        *admin.server_flags(f"$({admin.KEY_ENV})"),
    ]


def _http_check(port: int, path: str) -> dict:
    """An exec probe on Triton's loopback port (kubelet's httpGet reaches only the pod IP); stdlib only."""
    code = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}{path}', timeout=2)"
    return {"exec": {"command": ["python3", "-c", code]}}


def _mib(x: int) -> str:
    return f"{x}Mi"


def triton_container(p: Ports, s: Sizing) -> dict:
    from serving import admin

    startup_period = 10
    return {
        "name": "triton",
        "image": IMAGE["cpu"],
        "command": ["tritonserver"],
        "args": triton_args(p),
        "env": [
            {"name": "TRITON_BACKEND_DIRECTORY", "value": "/opt/attnzoo/triton/backends"},
            {"name": "TRITON_GPU_METRICS", "value": "false"},
            {"name": admin.KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": "key"}}},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # the root filesystem is read-only
        ],
        "ports": [{"name": "metrics", "containerPort": p.metrics, "protocol": "TCP"}],
        # NVIDIA's k8s-onprem chart: startup on ready (loads every model), then liveness on live: a model that is
        # slow to load must not get the server killed (server#7014).
        "startupProbe": {**_http_check(p.http, "/v2/health/ready"), "periodSeconds": startup_period,
                         "timeoutSeconds": 5, "failureThreshold": s.startup_s() // startup_period},
        "livenessProbe": {**_http_check(p.http, "/v2/health/live"), "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": "1", "memory": _mib(s.memory_mib("cpu"))},
                      "limits": {"memory": _mib(s.memory_mib("cpu"))}},  # no CPU limit: throttling costs the tail
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def frontdoor_container(p: Ports) -> dict:
    return {
        "name": "frontdoor",
        "image": IMAGE["cpu"],
        "command": ["python", "-m", "serving.frontdoor"],
        "args": ["--host=0.0.0.0", f"--port={p.frontdoor}", f"--triton-grpc=127.0.0.1:{p.grpc}",
                 f"--model-repository={MODELS_DIR}"],
        "ports": [{"name": "http", "containerPort": p.frontdoor, "protocol": "TCP"}],
        # Ready means every model that failed a request answers a real probe inference again (a dead python stub
        # leaves Triton's own ready at 200): the Service stops sending this pod requests until then.
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 3, "failureThreshold": 2},
        # Alive is the front door's own event loop answering; its /v2/health/live asks Triton, whose liveness is
        # the triton container's.
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints drop the pod before the process gets SIGTERM; keep serving meanwhile.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": {"cpu": "250m", "memory": _mib(FRONTDOOR_MIB)},
                      "limits": {"memory": _mib(FRONTDOOR_MIB)}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def repository_init() -> dict:
    """Copies the image's repository into the pod's (writable: the GPU overlay adds its engines there)."""
    return {
        "name": "repository",
        "image": IMAGE["cpu"],
        "command": ["cp", "-R", f"{BAKED_REPOSITORY}/.", f"{MODELS_DIR}/"],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
    }


def deployment(p: Ports, s: Sizing) -> dict:
    grace = 30
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP},
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": LABELS},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(p.metrics),
                    "prometheus.io/path": "/metrics"}},
                "spec": {
                    "serviceAccountName": APP,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [repository_init()],
                    "containers": [frontdoor_container(p), triton_container(p, s)],
                    "volumes": [
                        {"name": "models", "emptyDir": {}},
                        # The python backend keeps every request's tensors in /dev/shm; a container's default is
                        # 64 MB (server#4869, kserve#1937).
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mib(s.shm_mib("cpu"))}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                   "whenUnsatisfiable": "ScheduleAnyway",
                                                   "labelSelector": {"matchLabels": LABELS}}],
                },
            },
        },
    }


def service(p: Ports) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": APP},
        "spec": {"type": "ClusterIP", "selector": LABELS,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }


def hpa(s: Sizing) -> dict:
    """Pods metrics (prometheus-adapter, deploy/prometheus/adapter.yaml): the HPA scales to the larger proposal."""
    def pods_metric(name: str, target: int) -> dict:
        return {"type": "Pods", "pods": {"metric": {"name": name},
                                         "target": {"type": "AverageValue", "averageValue": str(target)}}}

    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": APP},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
            "minReplicas": 2,
            "maxReplicas": 8,
            "metrics": [pods_metric(SIGNALS["queue"][0], s.queue_target_us()),
                        pods_metric(SIGNALS["pending"][0], s.max_preferred_batch)],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}},
        },
    }


def pdb() -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": APP},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": LABELS}}}


def network_policy(p: Ports) -> dict:
    """Only the front door's port and the metrics port take connections (Triton's own ports are on loopback)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": APP},
            "spec": {"podSelector": {"matchLabels": LABELS}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": p.frontdoor, "protocol": "TCP"},
                                            {"port": p.metrics, "protocol": "TCP"}]}]}}


def service_account() -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": APP},
            "automountServiceAccountToken": False}


# ------------------------------------------------------------------------------------------- overlays


def cpu_patch(s: Sizing) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP}, "spec": {"template": {
        "spec": {"containers": [{"name": "triton", "resources": {
            "requests": {"cpu": "2", "memory": _mib(s.memory_mib("cpu"))},
            "limits": {"memory": _mib(s.memory_mib("cpu"))}}}]}}}}


def engine_script() -> str:
    """The GPU init step: engines for this pod's GPU (full TensorRT), then configs for the native backends."""
    return " && ".join([
        f"cp -R {BAKED_REPOSITORY}/. {MODELS_DIR}/",
        "python -m export.engines all --precision fp16 --deploy fp16",
        f"python -m serving.repository --target gpu --repo {MODELS_DIR}",
    ])


GPU_TRITON_PATH = "/opt/tritonserver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def gpu_patch(s: Sizing) -> dict:
    gpu = {"nvidia.com/gpu": "1"}
    memory = _mib(s.memory_mib("gpu") + 1024)  # + CUDA context, cuDNN/TensorRT libraries
    init = {"name": "repository", "command": ["/bin/sh", "-c", engine_script()],
            "env": [{"name": "ATTNZOO_REPOSITORY", "value": MODELS_DIR},
                    {"name": "ATTNZOO_ARTIFACTS", "value": "/tmp/artifacts"},
                    {"name": "ATTNZOO_REPORTS", "value": "/tmp/reports"},
                    {"name": "HOME", "value": "/tmp"}],  # CUDA's and TensorRT's caches; the root is read-only
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi", **gpu}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    triton = {"name": "triton",
              "env": [{"name": "TRITON_BACKEND_DIRECTORY", "value": "/opt/tritonserver/backends"},
                      {"name": "TRITON_GPU_METRICS", "value": "true"},
                      # The image's own python3 for the python backend's stubs, not the engine builder's venv
                      # (a stub finds its packages from PATH: serving.server.server_env).
                      {"name": "PATH", "value": GPU_TRITON_PATH}],
              "resources": {"requests": {"cpu": "2", "memory": memory}, "limits": {"memory": memory, **gpu}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP}, "spec": {"template": {"spec": {
        "initContainers": [init], "containers": [triton],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mib(s.shm_mib("gpu"))}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}}


def kustomization(resources: list[str], patches: list[str] = (), images: list[dict] = (),
                  suffix: str = "") -> dict:
    k: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": resources}
    if suffix:
        k["nameSuffix"] = suffix
    if images:
        k["images"] = list(images)
    if patches:
        k["patches"] = [{"path": x} for x in patches]
    return k


# --------------------------------------------------------------------------------------------- KServe


KSERVE_HTTP_PORT, KSERVE_GRPC_PORT = 8080, 9000  # KServe's Triton runtime: config/runtimes/kserve-tritonserver.yaml


def serving_runtime(p: Ports, s: Sizing) -> dict:
    """Triton in KServe's container ``kserve-container`` (the one the storage initializer mounts /mnt/models
    into). gRPC (grpc-v2) on the pod IP for the InferenceService's transformer, the front door; HTTP on loopback for
    the probes only, as in the pod of deploy/k8s."""
    from serving import admin

    kp = Ports(KSERVE_HTTP_PORT, KSERVE_GRPC_PORT, p.metrics, p.frontdoor)
    args = [a for a in triton_args(kp) if not a.startswith(("--model-repository", "--grpc-address"))]
    memory = _mib(s.memory_mib("cpu"))
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": f"{APP}-triton", "annotations": {"serving.kserve.io/server-type": "tritonserver"}},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(p.metrics), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": True, "priority": 1}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [{
                "name": "kserve-container",
                "image": IMAGE["cpu"],
                "command": ["tritonserver"],
                "args": ["--model-repository=/mnt/models", *args],
                "env": [{"name": "TRITON_BACKEND_DIRECTORY", "value": "/opt/attnzoo/triton/backends"},
                        {"name": "TRITON_GPU_METRICS", "value": "false"},
                        {"name": admin.KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": "key"}}},
                        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
                "startupProbe": {**_http_check(kp.http, "/v2/health/ready"), "periodSeconds": 10,
                                 "timeoutSeconds": 5, "failureThreshold": s.startup_s() // 10},
                "livenessProbe": {**_http_check(kp.http, "/v2/health/live"), "periodSeconds": 10,
                                  "timeoutSeconds": 5, "failureThreshold": 3},
                "resources": {"requests": {"cpu": "1", "memory": memory}, "limits": {"memory": memory}},
                "securityContext": {**RESTRICTED, "runAsUser": 1000},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mib(s.shm_mib("cpu"))}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
        },
    }


# KServe appends --model_name/--predictor_host/--http_port to a transformer's args (transformer_custom.go); the
# front door takes --triton-grpc, so a shell maps the predictor's host onto it and ignores the rest.
TRANSFORMER_SH = ('host=; while [ $# -gt 0 ]; do [ "$1" = --predictor_host ] && host=$2; shift; done; '
                  'exec python -m serving.frontdoor --host=0.0.0.0 --port=8080 --triton-grpc="$host:80"')


def inference_service(bucket_path: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": APP, "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"}},
        "spec": {
            "predictor": {
                "serviceAccountName": f"{APP}-s3",
                "minReplicas": 1,
                "maxReplicas": 4,
                "model": {
                    "modelFormat": {"name": "triton", "version": "2"},
                    "runtime": f"{APP}-triton",
                    "protocolVersion": "grpc-v2",
                    "storageUri": f"s3://{bucket_path}",
                    # gRPC to the predictor (the front door's upstream); h2c names it for the Service.
                    "ports": [{"name": "h2c", "containerPort": KSERVE_GRPC_PORT, "protocol": "TCP"}],
                },
            },
            "transformer": {
                "minReplicas": 1,
                "containers": [{
                    "name": "kserve-container",
                    "image": IMAGE["cpu"],
                    "command": ["/bin/sh", "-c", TRANSFORMER_SH, "frontdoor"],
                    "ports": [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}, "periodSeconds": 5},
                    "resources": {"requests": {"cpu": "250m", "memory": _mib(FRONTDOOR_MIB)},
                                  "limits": {"memory": _mib(FRONTDOOR_MIB)}},
                    "securityContext": RESTRICTED,
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
            },
        },
    }


def s3_secret() -> dict:
    """KServe's storage initializer reads these annotations (docs/samples/multimodelserving/triton/s3_secret.yaml);
    the values are placeholders: create the real Secret out of band."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": S3_SECRET, "annotations": {
            "serving.kserve.io/s3-endpoint": "minio.storage.svc:9000",
            "serving.kserve.io/s3-usehttps": "0",
            "serving.kserve.io/s3-region": "us-east-1",
            "serving.kserve.io/s3-useanoncredential": "false"}},
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"},
    }


def s3_service_account() -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": f"{APP}-s3"},
            "secrets": [{"name": S3_SECRET}]}


# ---------------------------------------------------------------------------------------- Prometheus


def adapter_rules() -> dict:
    """prometheus-adapter's ``rules`` (its Helm chart's ``rules.custom``): each recorded per-pod series becomes a
    custom metric of the pod, named as the HPA asks for it."""
    def rule(metric: str, series: str) -> dict:
        return {"seriesQuery": f'{series}{{namespace!="",pod!=""}}',
                "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                "name": {"matches": f"^{series}$", "as": metric},
                "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"}

    return {"rules": {"custom": [rule(m, s) for m, s in SIGNALS.values()]}}


TRITON_JOB = "attnzoo-triton"  # the scrape job of the Triton replicas (metrics port), here and in a cluster
ERROR_RATIO = 0.05


def prometheus_rules(s: Sizing) -> str:
    """Recording rules for the autoscaling signals and the alerts. Grouped by (namespace, pod, instance): a pod in
    a cluster, an ``instance`` (host:metrics port) on one host, where namespace and pod are absent."""
    by = "namespace, pod, instance"
    queue, pending = SIGNALS["queue"][1], SIGNALS["pending"][1]
    return f"""\
# Generated by `python -m serving.k8s` (make manifests) from the model specs; do not edit.
# Tested by `promtool test rules deploy/prometheus/rules_test.yml` (tests/test_prometheus_rules.py).
groups:
  - name: attnzoo-autoscaling
    rules:
      # Request-weighted queue time per replica: all of its models' queue time over all of its requests. NVIDIA's
      # k8s-onprem rule averages per-model ratios with n+1 in the denominator, so idle models and low counts pull
      # it down (server#8979); this one is what a request on this replica waited, on average.
      - record: attnzoo:queue_us:rate1m
        expr: sum by ({by}) (rate(nv_inference_queue_duration_us[1m]))
      - record: attnzoo:request_success:rate1m
        expr: sum by ({by}) (rate(nv_inference_request_success[1m]))
      - record: {queue}
        expr: |
          attnzoo:queue_us:rate1m / (attnzoo:request_success:rate1m > 0)
            or attnzoo:request_success:rate1m * 0
      # Requests waiting in the replica's schedulers now (a gauge: no rate window, no lag).
      - record: {pending}
        expr: sum by ({by}) (nv_inference_pending_request_count)
  - name: attnzoo-alerts
    rules:
      - alert: AttnzooReplicaDown
        expr: up{{job="{TRITON_JOB}"}} == 0
        for: 1m
        labels: {{severity: critical}}
        annotations:
          summary: "Triton replica {{{{ $labels.instance }}}} does not answer its metrics scrape"
      - alert: AttnzooNoReplicas
        expr: absent(up{{job="{TRITON_JOB}"}} == 1)
        for: 2m
        labels: {{severity: critical}}
        annotations:
          summary: "no Triton replica is up"
      - alert: AttnzooErrorRatioHigh
        expr: |
          sum by ({by}) (rate(nv_inference_request_failure[5m]))
            / (sum by ({by}) (rate(nv_inference_request_failure[5m]))
               + sum by ({by}) (rate(nv_inference_request_success[5m])))
            > {ERROR_RATIO}
        for: 5m
        labels: {{severity: warning}}
        annotations:
          summary: "{{{{ $labels.instance }}}}: {{{{ $value | humanizePercentage }}}} of inferences fail"
      # A model that is loaded but cannot answer (its python stub died: Triton still says READY) fails every request.
      - alert: AttnzooModelNotAnswering
        expr: |
          sum by ({by}, model) (rate(nv_inference_request_failure[2m])) > 0
            unless sum by ({by}, model) (rate(nv_inference_request_success[2m])) > 0
        for: 2m
        labels: {{severity: critical}}
        annotations:
          summary: "{{{{ $labels.instance }}}}: model {{{{ $labels.model }}}} fails every request"
      # Triton exports a model's counters once it is loaded: fewer models than the specs serve means some did not
      # load (explicit model control keeps the others up, so nothing else would say so).
      - alert: AttnzooModelsNotLoaded
        expr: count by ({by}) (nv_inference_request_success) < {s.models}
        for: 5m
        labels: {{severity: warning}}
        annotations:
          summary: "{{{{ $labels.instance }}}} serves {{{{ $value }}}} models of {s.models}"
"""


# NVIDIA's autoscaling rule, as triton-inference-server/server deploy/k8s-onprem/values.yaml (commit e1db8a60) gives
# it to prometheus-adapter; recorded here only so that the tests can show what it reports.
K8S_ONPREM_RULE = """\
# Generated by `python -m serving.k8s`; do not deploy. NVIDIA's k8s-onprem autoscaling rule (server#8979), kept as
# the reference the rule tests compare against (deploy/prometheus/rules_test.yml).
groups:
  - name: k8s-onprem-reference
    rules:
      - record: avg_time_queue_us
        expr: avg(delta(nv_inference_queue_duration_us[30s]) / (1 + delta(nv_inference_request_success[30s]))) by (pod)
"""


def prometheus_rule_tests(s: Sizing) -> str:
    """``promtool test rules`` cases: the signals on made-up counters whose true answer is known, and each alert."""
    queue, pending = SIGNALS["queue"][1], SIGNALS["pending"][1]
    la, lb = 'namespace="ml", pod="a", instance="10.0.0.1:8002"', 'namespace="ml", pod="b", instance="10.0.0.2:8002"'
    a, b = f'{la}, job="{TRITON_JOB}"', f'{lb}, job="{TRITON_JOB}"'  # a scraped series' labels
    ka = 'namespace: ml, pod: a, instance: "10.0.0.1:8002"'  # an alert's (YAML)
    return f"""\
# Generated by `python -m serving.k8s` (make manifests); do not edit. Run: promtool test rules rules_test.yml
rule_files: [rules.yml, reference/k8s_onprem_avg_time_queue.yml]
evaluation_interval: 15s
tests:
  # Pod a: model "busy" takes 4 requests/s that each wait 8000 us in the queue; model "idle" takes none.
  # Pod b: 0.4 requests/s that wait 1000 us each, and one request pending. Every request on pod a waited 8000 us.
  - name: the request-weighted signal reports what requests waited; NVIDIA's rule reports half
    interval: 15s
    input_series:
      - series: nv_inference_queue_duration_us{{{a}, model="busy", version="1"}}
        values: 0+480000x40
      - series: nv_inference_request_success{{{a}, model="busy", version="1"}}
        values: 0+60x40
      - series: nv_inference_queue_duration_us{{{a}, model="idle", version="1"}}
        values: 0x40
      - series: nv_inference_request_success{{{a}, model="idle", version="1"}}
        values: 0x40
      - series: nv_inference_pending_request_count{{{a}, model="busy", version="1"}}
        values: 10x40
      - series: nv_inference_pending_request_count{{{a}, model="idle", version="1"}}
        values: 0x40
      - series: nv_inference_queue_duration_us{{{b}, model="busy", version="1"}}
        values: 0+6000x40
      - series: nv_inference_request_success{{{b}, model="busy", version="1"}}
        values: 0+6x40
      - series: nv_inference_pending_request_count{{{b}, model="busy", version="1"}}
        values: 1x40
    promql_expr_test:
      - expr: {queue}
        eval_time: 5m
        exp_samples:
          - labels: '{queue}{{{la}}}'
            value: 8000
          - labels: '{queue}{{{lb}}}'
            value: 1000
      # (960000 / (1 + 120) + 0 / (1 + 0)) / 2 = 3967: the idle model halves it, the +1 takes another 1%.
      - expr: avg_time_queue_us{{pod="a"}}
        eval_time: 5m
        exp_samples:
          - labels: 'avg_time_queue_us{{pod="a"}}'
            value: 3966.9421487603304
      - expr: {pending}
        eval_time: 5m
        exp_samples:
          - labels: '{pending}{{{la}}}'
            value: 10
          - labels: '{pending}{{{lb}}}'
            value: 1

  # An idle replica reports 0, not nothing (0/0 would be NaN and drop it from the HPA's average).
  - name: an idle replica's queue time is 0
    interval: 15s
    input_series:
      - series: nv_inference_queue_duration_us{{{a}, model="busy", version="1"}}
        values: 5000x40
      - series: nv_inference_request_success{{{a}, model="busy", version="1"}}
        values: 7x40
    promql_expr_test:
      - expr: {queue}
        eval_time: 5m
        exp_samples:
          - labels: '{queue}{{{la}}}'
            value: 0

  - name: alerts
    interval: 1m
    input_series:
      - series: up{{{a}}}
        values: 1x20
      - series: up{{{b}}}
        values: 1 1 0x18
      # Pod a: model "busy" fails 10 of every 100 requests, model "broken" all of its 3 a minute: 13 of 103 fail.
      - series: nv_inference_request_success{{{a}, model="busy", version="1"}}
        values: 0+90x20
      - series: nv_inference_request_failure{{{a}, model="busy", version="1", reason="BACKEND"}}
        values: 0+10x20
      - series: nv_inference_request_success{{{a}, model="broken", version="1"}}
        values: 0x20
      - series: nv_inference_request_failure{{{a}, model="broken", version="1", reason="BACKEND"}}
        values: 0+3x20
    alert_rule_test:
      - alertname: AttnzooReplicaDown
        eval_time: 2m
      - alertname: AttnzooReplicaDown
        eval_time: 4m
        exp_alerts:
          - exp_labels: {{severity: critical, namespace: ml, pod: b, instance: "10.0.0.2:8002", job: {TRITON_JOB}}}
            exp_annotations:
              summary: "Triton replica 10.0.0.2:8002 does not answer its metrics scrape"
      - alertname: AttnzooNoReplicas
        eval_time: 10m
      - alertname: AttnzooErrorRatioHigh
        eval_time: 12m
        exp_alerts:
          - exp_labels: {{severity: warning, {ka}}}
            exp_annotations:
              summary: "10.0.0.1:8002: 12.62% of inferences fail"
      - alertname: AttnzooModelNotAnswering
        eval_time: 10m
        exp_alerts:
          - exp_labels: {{severity: critical, {ka}, model: broken}}
            exp_annotations:
              summary: "10.0.0.1:8002: model broken fails every request"
      - alertname: AttnzooModelsNotLoaded
        eval_time: 10m
        exp_alerts:
          - exp_labels: {{severity: warning, {ka}}}
            exp_annotations:
              summary: "10.0.0.1:8002 serves 2 models of {s.models}"

  - name: no replica up
    interval: 1m
    input_series:
      - series: up{{{a}}}
        values: 0x10
    alert_rule_test:
      - alertname: AttnzooNoReplicas
        eval_time: 5m
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "no Triton replica is up"
"""


# ---------------------------------------------------------------------------------------- containers


CONTAINERFILE_HEAD = """\
# Generated by `python -m serving.k8s` (make manifests); do not edit. Written, not built: no registry can be
# reached where this was generated, so no image was pulled or built. Build from the repository root after
# `make export`:   podman build -f deploy/containers/Containerfile.{target} -t {image} .
"""


def containerfile_cpu() -> str:
    return CONTAINERFILE_HEAD.format(target="cpu", image=f"{IMAGE['cpu']}:{image_tag()}") + f"""\
# pip's tritonserver 2.51 (nvidia-pytriton) with the python backend + onnxruntime: what `make serve` runs.
FROM docker.io/library/python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 ATTNZOO_TRITON_RUNTIME=/opt/attnzoo/triton
WORKDIR /opt/attnzoo/src
COPY pyproject.toml README.md ./
COPY training training
COPY export export
COPY serving serving
# The CPU torch wheel: a bare `torch` from PyPI pulls the CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \\
 && pip install . \\
 && python -c "from serving.server import prepare_runtime; prepare_runtime()" \\
 && ln -s "$(python -c 'from serving.server import tritonserver_bin; print(tritonserver_bin())')" \\
          /usr/local/bin/tritonserver
# tritonserver's libraries (serving.server.server_env): the wheel's, this Python's, and the runtime's links.
ENV LD_LIBRARY_PATH=/usr/local/lib/python3.11/site-packages/nvidia_pytriton.libs:/usr/local/lib:/opt/attnzoo/triton/lib
COPY model_repository {BAKED_REPOSITORY}
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin serving
USER 1000
"""


def containerfile_gpu() -> str:
    return CONTAINERFILE_HEAD.format(target="gpu", image=f"{IMAGE['gpu']}:{image_tag()}") + f"""\
# NVIDIA's Triton ({TRITON_IMAGE_TAG} = tritonserver 2.51): native onnxruntime and TensorRT backends, CUDA, TensorRT.
FROM {NVIDIA_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# The python-backend models that stay python on a GPU host (BLS compositions, image preprocessing) run in the
# image's own python3 and import the project's `training` and `export` packages from the source tree.
WORKDIR /opt/attnzoo/src
COPY pyproject.toml README.md ./
COPY training training
COPY export export
COPY serving serving
ENV PYTHONPATH=/opt/attnzoo/src
# The engine builder (python -m export.engines) needs the project's Python (3.11) and TensorRT's Python bindings
# of the same version as the image's libnvinfer, or Triton's TensorRT backend refuses the engines.
RUN pip install uv \\
 && uv python install 3.11 \\
 && uv venv --python 3.11 /opt/attnzoo/venv \\
 && VIRTUAL_ENV=/opt/attnzoo/venv uv pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \\
 && VIRTUAL_ENV=/opt/attnzoo/venv uv pip install . \\
      "tensorrt==$(dpkg-query -W -f='${{Version}}' libnvinfer10 | cut -d- -f1)" \\
 && python3 -m pip install numpy pillow
ENV PATH=/opt/attnzoo/venv/bin:$PATH
COPY model_repository {BAKED_REPOSITORY}
USER 1000
"""


# ------------------------------------------------------------------------------------------ the tree


def image_tag() -> str:
    """The project's version (pyproject.toml): what `podman build -t` should tag."""
    from importlib.metadata import version

    return version("attention-zoo")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a shared dict is written out each time: no &id001 anchors
        return True


def _yaml(*docs: dict) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


def generate(names: list[str] | None = None) -> dict[str, str]:
    """{path under deploy/: text} for every generated file."""
    p, s = ports(), sizing(names)
    head = "# Generated by `python -m serving.k8s` (make manifests) from the model specs; do not edit.\n"
    base = {"deployment.yaml": deployment(p, s), "service.yaml": service(p), "hpa.yaml": hpa(s),
            "pdb.yaml": pdb(), "networkpolicy.yaml": network_policy(p), "serviceaccount.yaml": service_account()}
    files = {f"k8s/base/{k}": head + _yaml(v) for k, v in base.items()}
    files["k8s/base/kustomization.yaml"] = head + _yaml(kustomization(sorted(base)))
    for target, patch in (("cpu", cpu_patch(s)), ("gpu", gpu_patch(s))):
        d = f"k8s/overlays/{target}"
        files[f"{d}/deployment-patch.yaml"] = head + _yaml(patch)
        images = [{"name": IMAGE["cpu"], "newName": IMAGE[target], "newTag": image_tag()}]
        files[f"{d}/kustomization.yaml"] = head + _yaml(
            kustomization(["../../base"], ["deployment-patch.yaml"], images, suffix=f"-{target}"))
    files["kserve/servingruntime.yaml"] = head + _yaml(serving_runtime(p, s))
    files["kserve/inferenceservice.yaml"] = head + _yaml(inference_service("models/attention-zoo/model_repository"))
    files["kserve/s3.yaml"] = head + _yaml(s3_secret(), s3_service_account())
    files["prometheus/adapter.yaml"] = head + _yaml(adapter_rules())
    files["prometheus/rules.yml"] = prometheus_rules(s)
    files["prometheus/rules_test.yml"] = prometheus_rule_tests(s)
    files["prometheus/reference/k8s_onprem_avg_time_queue.yml"] = K8S_ONPREM_RULE
    files["containers/Containerfile.cpu"] = containerfile_cpu()
    files["containers/Containerfile.gpu"] = containerfile_gpu()
    files["k8s/sizing.json"] = json.dumps({"sizing": s.__dict__, "ports": p.__dict__,
                                           "memory_mib": {t: s.memory_mib(t) for t in s.stubs},
                                           "shm_mib": {t: s.shm_mib(t) for t in s.stubs},
                                           "startup_s": s.startup_s(), "queue_target_us": s.queue_target_us()},
                                          indent=2) + "\n"
    return files


def write(out: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for rel, text in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def check(out: Path, files: dict[str, str]) -> list[str]:
    """Unified diffs of every generated file that differs from what is on disk (empty: up to date)."""
    diffs = []
    for rel, text in sorted(files.items()):
        path = out / rel
        old = path.read_text() if path.exists() else ""
        if old != text:
            diffs.append("".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                      f"{path} (on disk)", f"{path} (generated)")))
    return diffs


# ----------------------------------------------------------------------------------- vendored CRD schemas


KSERVE_SOURCE = "kserve/kserve@aaac4e294dae2c7b1aa1886447793f3aa1c30912"
SCHEMAS_DIR = "schemas"  # under deploy/


def vendor_crd(crd_yaml: Path, out_dir: Path, source: str, drop: tuple[str, ...] = ()) -> Path:
    """Keep the ``openAPIV3Schema`` of a CRD's storage version (less the top-level ``spec`` fields in ``drop``) as
    JSON, with where it came from: what the manifests' CRD objects are validated against offline."""
    crd = yaml.safe_load(crd_yaml.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)  # written by the controller, never by us
    for name in drop:
        schema["properties"]["spec"]["properties"].pop(name)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    doc = {"$comment": f"openAPIV3Schema of {group}/{version['name']} {kind} from {source}:"
                       f"config/crd/full/{crd_yaml.name}" + (f", without spec.{', spec.'.join(drop)}" if drop else "")
                       + " and status (python -m serving.k8s --vendor-crd)",
           "x-group-version-kind": {"group": group, "version": version["name"], "kind": kind}, **schema}
    out = out_dir / f"{group}_{version['name']}_{kind.lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    from training import paths

    ap = argparse.ArgumentParser(prog="python -m serving.k8s", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=paths.REPO_ROOT / "deploy", help="folder (default: deploy/)")
    ap.add_argument("--check", action="store_true", help="fail if a committed file differs from the generated one")
    ap.add_argument("--vendor-crd", type=Path, nargs="+", metavar="CRD_YAML",
                    help=f"write the schemas of these KServe CRD files (from {KSERVE_SOURCE}) under deploy/schemas")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    a = ap.parse_args(argv)
    try:
        if a.vendor_crd:
            for crd in a.vendor_crd:  # an InferenceService here has a predictor and a transformer only
                drop = ("canary", "explainer") if crd.name.endswith("inferenceservices.yaml") else ()
                print(vendor_crd(crd, a.out / SCHEMAS_DIR, KSERVE_SOURCE, drop))
            return 0
        files = generate()
        if a.check:
            diffs = check(a.out, files)
            if diffs:
                print("".join(diffs), end="")
                raise ManifestError(f"{len(diffs)} file(s) under {a.out} differ from the specs: run `make manifests`")
            print(f"{len(files)} files under {a.out} match the specs")
        else:
            for path in write(a.out, files):
                print(path)
    except Exception as e:
        return cli_error(e, a.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
