"""Getting a trained quantized model out: ONNX with integer weights, and a bit-packed checkpoint."""
