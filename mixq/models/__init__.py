"""The only place that knows model architectures: where the blocks are, which linears they hold, how to load.
Every module of the package is imported, so a family's file registers its adapter on its own."""
from ..registry import import_all
from .adapters import ADAPTERS, Adapter, adapter_for
from .load import DEFAULT_MODEL, ModelError, load_model

import_all(__name__, __path__)

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "DEFAULT_MODEL", "ModelError", "load_model"]
