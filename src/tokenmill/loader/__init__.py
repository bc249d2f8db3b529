"""Model loading: find a model (default, local, Hub) and read its config and weights.

`resolve_model(None)` gives the embedded SmolLM2-135M-Instruct GGUF; `source.config()` is a
Hugging Face config dict and `source.iter_weights()` yields `(hf_name, tensor)` one at a time.
"""

from __future__ import annotations

from tokenmill.loader.default_model import DEFAULT_MODEL_ID, default_model_path
from tokenmill.loader.errors import ModelLoadError
from tokenmill.loader.gguf_weights import gguf_metadata, read_gguf
from tokenmill.loader.source import ModelSource, resolve_model

__all__ = [
    "DEFAULT_MODEL_ID",
    "ModelLoadError",
    "ModelSource",
    "default_model_path",
    "gguf_metadata",
    "read_gguf",
    "resolve_model",
]
