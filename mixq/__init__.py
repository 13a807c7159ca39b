"""mixq: mixed-precision post-training quantization."""
__version__ = "0.1.0"

from .io import load  # noqa: E402

__all__ = ["load"]
