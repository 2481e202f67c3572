"""Generated Triton kernels for fused regions (imported as surgeon.kernels)."""
