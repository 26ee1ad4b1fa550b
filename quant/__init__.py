"""Quantization formats: GGML type geometry, numpy reference (de)quantizers."""
