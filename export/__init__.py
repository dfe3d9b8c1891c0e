"""Second stage: torch -> ONNX (+ FP16 graph) -> checks -> parity gate -> TensorRT engines."""
