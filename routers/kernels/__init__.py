"""Fused routing kernels (Triton) with their PyTorch reference twins."""
