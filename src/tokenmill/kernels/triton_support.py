"""Whether the optional triton package is there, and whether its CPU interpreter runs the
kernels (TRITON_INTERPRET=1, the tests' way to check them without a GPU)."""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
