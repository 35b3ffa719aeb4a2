"""Weight quantization algorithms: pure functions (W, spec, stats) -> QuantizedWeight."""
