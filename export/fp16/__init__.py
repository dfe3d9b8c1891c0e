from export.fp16.passes import Fp16GraphError, convert_to_fp16, kept_op_problems  # noqa: F401
