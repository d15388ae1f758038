"""Attention and cache kernels. Each kernel has a plain-torch reference (its test oracle)."""
