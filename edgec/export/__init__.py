"""Export compressed models to deployable artifacts (ONNX Q/DQ, TensorRT engines)."""
