"""Using a model: decoding (greedy, sampling, beams, batches, streaming), prompt formats, quantization, CPU kernels,
GGUF export. `phikit.generate`, `phikit.stream` and `phikit.chat` are the entry points most callers need."""
