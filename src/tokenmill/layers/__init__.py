"""Shared building blocks: every model family is assembled from these, so LoRA, quantization
and tensor parallelism later plug into `linear.py` once instead of into each model."""
