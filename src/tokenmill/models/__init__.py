"""Model families, one file each, built only from `tokenmill.layers`."""

from tokenmill.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "supported_architectures"]
