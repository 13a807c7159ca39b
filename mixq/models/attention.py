"""Watching a transformers attention module's own attention function: the query and key states it receives (after
RoPE and any q/k norm), its mask and scaling, beside the input of the value projection."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from torch import nn


@contextmanager
def watch(block: nn.Module, value: str, on_call):
    """Under this, each call of the attention function by the attention module that holds `value` (the value
    projection's path in `block`) also calls on_call(x, query, key, mask, scaling, causal), x the value
    projection's input of that call. The function is wrapped for the run and restored after."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = block.get_submodule(value.rsplit(".", 1)[0])
    impl = attn.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS.get_interface(
        impl, getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None))
    overridden = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    seen = {}

    def stash(_module, args):
        seen["x"] = args[0]

    def wrapped(module, query, key, value_states, attention_mask, *args, **kwargs):
        if module is attn:
            causal = getattr(module, "is_causal", True)
            on_call(seen.pop("x"), query, key, attention_mask, kwargs.get("scaling"), causal)
        return original(module, query, key, value_states, attention_mask, *args, **kwargs)

    handle = block.get_submodule(value).register_forward_pre_hook(stash)
    ALL_ATTENTION_FUNCTIONS[impl] = wrapped
    try:
        yield
    finally:
        handle.remove()
        if overridden is None:
            del ALL_ATTENTION_FUNCTIONS[impl]
        else:
            ALL_ATTENTION_FUNCTIONS[impl] = overridden
