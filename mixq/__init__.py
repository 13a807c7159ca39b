"""mixq: mixed-precision post-training quantization."""
from .io import load

__all__ = ["load"]
__version__ = "0.1.0"
