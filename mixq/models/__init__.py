"""The only place that knows model architectures: where the blocks are, which linears they hold, how to load."""
from .adapters import Adapter, adapter_for
from .load import DEFAULT_MODEL, ModelError, load_model

__all__ = ["Adapter", "adapter_for", "DEFAULT_MODEL", "ModelError", "load_model"]
