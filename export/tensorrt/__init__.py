"""TensorRT: parse ONNX graphs, build serialized engines, record what each engine is tied to, and run them.

- ``library``: which TensorRT is here (full ``tensorrt`` 10/11 or ``tensorrt_rtx``), its errors, arch names;
- ``profiles``: one (min, opt, max) shape per named input, from the spec's Dims and batch range;
- ``loaders``: Polygraphy-style loaders (network from ONNX -> config -> engine bytes -> saved with its
  sidecar), and ``parse_onnx``/``build_engine`` composed from them;
- ``engine_info``: the ``<plan>.json`` sidecar and the compatibility check;
- ``runner``: ``TensorRTRunner``, the runners' ``infer(feeds) -> outputs`` over an engine (needs a GPU).

TensorRT is imported only when a function needs it.
"""

from export.tensorrt.engine_info import (
    METADATA_FORMAT,
    EngineInfo,
    check_engine_compatible,
    engine_info_or_none,
    metadata_path,
    read_engine_info,
    sha256,
    write_engine_info,
)
from export.tensorrt.library import (
    AOT_ARCHS,
    DEFAULT_AOT_ARCHS,
    FLAVOURS,
    PRECISIONS,
    WORKSPACE_BYTES,
    EngineBuildError,
    EngineMismatchError,
    TensorRTParseError,
    TensorRTUnavailable,
    TensorRTUnavailableError,
    arch_name,
    device_compute_capability,
    import_trt,
    make_logger,
    normalize_cc,
    trt_available,
)
from export.tensorrt.loaders import (
    BuiltEngine,
    CreateConfig,
    EngineBytesFromNetwork,
    EngineConfig,
    NetworkFromOnnxPath,
    ParsedNetwork,
    ParseReport,
    SaveEngine,
    build_engine,
    is_fp16_graph,
    is_qdq_graph,
    load_engine,
    network_layer_precisions,
    parse_onnx,
    spec_graph,
)
from export.tensorrt.profiles import ProfileError, check_network_inputs, outside_profile, profile_dict, profile_shapes
from export.tensorrt.runner import TensorRTRunner

__all__ = [
    "AOT_ARCHS",
    "DEFAULT_AOT_ARCHS",
    "FLAVOURS",
    "METADATA_FORMAT",
    "PRECISIONS",
    "WORKSPACE_BYTES",
    "BuiltEngine",
    "CreateConfig",
    "EngineBuildError",
    "EngineBytesFromNetwork",
    "EngineConfig",
    "EngineInfo",
    "EngineMismatchError",
    "NetworkFromOnnxPath",
    "ParseReport",
    "ParsedNetwork",
    "ProfileError",
    "SaveEngine",
    "TensorRTParseError",
    "TensorRTRunner",
    "TensorRTUnavailable",
    "TensorRTUnavailableError",
    "arch_name",
    "build_engine",
    "check_engine_compatible",
    "check_network_inputs",
    "device_compute_capability",
    "engine_info_or_none",
    "import_trt",
    "is_fp16_graph",
    "is_qdq_graph",
    "load_engine",
    "make_logger",
    "metadata_path",
    "network_layer_precisions",
    "normalize_cc",
    "outside_profile",
    "parse_onnx",
    "profile_dict",
    "profile_shapes",
    "read_engine_info",
    "sha256",
    "spec_graph",
    "trt_available",
    "write_engine_info",
]
