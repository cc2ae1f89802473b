"""Every place the workbench touches a private part of transformers, accelerate or torch, in one file.

Each function below is the only user of one private name; tests/test_compat.py checks that every one of them still
exists in the installed versions, so a release that moves one fails there, loudly and by name, instead of as a
silent wrong answer somewhere in a capture.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

Undo = Callable[[], None]


# ---- transformers: attention and experts implementations -------------------------------------------------
def register_attention_function(name: str, fn: Callable, mask_like: str | None) -> Undo:
    """Register `fn` as attention implementation `name` (and, when `mask_like` names one, its mask function:
    without it transformers silently drops the causal mask for an unknown name). Returns the undo."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, fn)
    undo_mask = None
    if mask_like is not None and mask_like in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])
        undo_mask = lambda: AttentionMaskInterface._global_mapping.pop(name, None)  # noqa: E731

    def undo() -> None:
        AttentionInterface._global_mapping.pop(name, None)
        if undo_mask is not None:
            undo_mask()
    return undo


def attention_implementation(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def set_attention_implementation(config: Any, name: str | None) -> Undo:
    """Switch one config's attention implementation (the attribute itself: no sub-config recursion)."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    return lambda: setattr(config, "_attn_implementation_internal", previous)


def original_attention(module: nn.Module, implementation: str) -> Callable:
    """The attention function `module` would call under `implementation`: its modeling file's interface (eager by
    default), as transformers' attention modules look it up."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(module).__module__]
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    eager = getattr(modeling, "eager_attention_forward", None)
    if implementation == "eager" and eager is not None:
        return eager
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as eager  # last resort
    return interface.get_interface(implementation, eager)


def register_experts_function(name: str, fn: Callable) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, fn)


def set_experts_implementation(config: Any, name: str | None) -> Undo:
    """Switch a config's experts implementation (the attribute itself, as for attention)."""
    previous = config._experts_implementation_internal
    config._experts_implementation_internal = name
    return lambda: setattr(config, "_experts_implementation_internal", previous)


def grouped_linear() -> Callable:
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear


def batched_linear() -> Callable:
    from transformers.integrations.moe import _batched_linear

    return _batched_linear


# ---- accelerate and torch -----------------------------------------------------------------------------------
def offload_hook(module: nn.Module):
    """accelerate's hook that loads an offloaded module's weights (None when the module is not offloaded)."""
    return getattr(module, "_hf_hook", None)


def swap_parameter(module: nn.Module, name: str, new: nn.Parameter) -> Undo:
    """Put `new` in place of a registered parameter without touching the original object; returns the undo."""
    original = module._parameters[name]
    module._parameters[name] = new
    return lambda: module._parameters.__setitem__(name, original)


TOUCHPOINTS = (
    ("transformers.modeling_utils", "AttentionInterface._global_mapping"),
    ("transformers.masking_utils", "AttentionMaskInterface._global_mapping"),
    ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    ("transformers.integrations.moe", "ALL_EXPERTS_FUNCTIONS"),
    ("transformers.integrations.moe", "_grouped_linear"),
    ("transformers.integrations.moe", "_batched_linear"),
    ("transformers.configuration_utils", "PretrainedConfig._attn_implementation_internal"),
    ("transformers.configuration_utils", "PretrainedConfig._experts_implementation_internal"),
)
