"""Bytes from the config alone: the meta-device skeleton, what each quantizer touches, KV cache, activations.

The model is built on the meta device (no memory, no download) and every parameter is counted in its
adapter group, with what a quantizer would do to it decided the way transformers decides.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from torch import nn

from workbench.model.adapters import adapter_for, text_config
from workbench.model.adapters import head_dim as adapter_head_dim
from workbench.model.presets import BYTES_PER_QUANTIZED_VALUE, Preset


# ---- the skeleton: parameters, their groups, and what each quantizer could touch ------------------
@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    numel: int
    group: str
    kind: str  # "expert3d": a fused 3-D expert tensor; "linear": an nn.Linear weight bnb converts; "plain"
    rows: int = 0  # output rows of a converted Linear weight (LLM.int8 keeps one fp32 scale per row)
    cols: int = 0  # input width of a converted Linear weight (NF4 needs a multiple of its block size)


NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: a Linear whose input width is not a multiple fails at its first
# forward on a CPU ("shape '[64, 1]' is invalid for input of size 96"), so such Linears stay unquantized.


_SKELETONS: dict[str, tuple[tuple[Param, ...], tuple[str, ...]]] = {}


def skeleton(config: Any, trust_remote_code: bool = False) -> tuple[Param, ...]:
    """Every parameter of the model, from a meta-device build (cached per config)."""
    return _skeleton_and_skips(config, trust_remote_code)[0]


def bnb_skip_modules(config: Any, *, quantize_router: bool = False, trust_remote_code: bool = False) -> list[str]:
    """`llm_int8_skip_modules` for bitsandbytes: transformers' own default skips (lm_head, tied weights), which
    it drops once a list is passed, plus every router and gate unless `quantize_router`."""
    adapter, _ = adapter_for(config)
    defaults = list(_skeleton_and_skips(config, trust_remote_code)[1])
    return defaults + ([] if quantize_router else adapter.gate_module_patterns())


def nf4_narrow_linears(config: Any, trust_remote_code: bool = False) -> list[str]:
    """Modules NF4 cannot quantize (input width not a multiple of NF4_BLOCK): kept in the compute dtype."""
    return [p.name.removesuffix(".weight") for p in skeleton(config, trust_remote_code)
            if p.kind == "linear" and p.cols % NF4_BLOCK]


def _skeleton_and_skips(config: Any, trust_remote_code: bool) -> tuple[tuple[Param, ...], tuple[str, ...]]:
    key = config.to_json_string()
    if key not in _SKELETONS:
        model = _build_meta_model(config, trust_remote_code)
        skips = _bnb_skipped_modules(model)
        _SKELETONS[key] = (_count(model, config, skips), tuple(skips))
    return _SKELETONS[key]


def _build_meta_model(config: Any, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:  # skipping the (meta) random init saves most of the build time
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with init_empty_weights(include_buffers=True), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "tie_word_embeddings",
               False):
        model.tie_weights()  # a tied lm_head is the embedding: count it once, as the loaded model stores it
    return model


def _count(model: nn.Module, config: Any, skip: list[str]) -> tuple[Param, ...]:
    adapter, _ = adapter_for(config)
    modules = dict(model.named_modules())
    params = []
    for name, p in model.named_parameters():  # tied weights appear once
        owner_name, _, leaf = name.rpartition(".")
        group = adapter.group_of(name)
        kind, rows, cols = "plain", 0, 0
        if p.dim() == 3 and group == "experts":
            kind = "expert3d"
        elif leaf == "weight" and _bnb_converts(modules[owner_name], owner_name, skip):
            kind, rows = "linear", _out_rows(modules[owner_name])
            cols = p.numel() // max(rows, 1)
        params.append(Param(name, p.numel(), group, kind, rows, cols))
    return tuple(params)


def _bnb_skipped_modules(model: nn.Module) -> list[str]:
    """The modules transformers' bitsandbytes quantizer leaves alone by default (lm_head, tied weights, ...)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _bnb_converts(module: nn.Module, module_name: str, skip: list[str]) -> bool:
    """Mirrors replace_with_bnb_linear: exactly nn.Linear (or GPT-2's Conv1D), unless skipped."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    return (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(module_name, skip)


def _out_rows(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]  # Conv1D is [in, out]


# ---- bytes per parameter under a preset -----------------------------------------------------
def dtype_bytes(preset: Preset) -> int:
    return preset.dtype.itemsize


def param_bytes(p: Param, preset: Preset, quantize_router: bool = False) -> tuple[float, bool]:
    """(bytes, quantized?) for one parameter stored under `preset` on a machine where it runs natively.
    Routers and gates stay unquantized under bitsandbytes unless `quantize_router` (see `bnb_skip_modules`)."""
    q, plain = preset.quantization, p.numel * dtype_bytes(preset)
    if p.group == "router" and not quantize_router:
        return plain, False
    if q == "mxfp4" and p.group == "experts":
        if p.kind == "expert3d":
            return p.numel * BYTES_PER_QUANTIZED_VALUE["mxfp4"], True
        return p.numel * 4, False  # Mxfp4GptOssExperts keeps the expert biases in float32
    if q == "bnb-int8" and p.kind == "linear":
        return p.numel * BYTES_PER_QUANTIZED_VALUE["bnb-int8"] + p.rows * 4, True
    if q == "bnb-nf4" and p.kind == "linear" and not p.cols % NF4_BLOCK:
        return p.numel * BYTES_PER_QUANTIZED_VALUE["bnb-nf4"], True
    return plain, False


# ---- KV cache and activations ------------------------------------------------------------
def _text_config(config: Any) -> Any:
    return text_config(config)


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window that caps its KV cache (None: the layer keeps every token)."""
    text = _text_config(config)
    n, window = text.num_hidden_layers, getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    if window and getattr(text, "use_sliding_window", True):
        return [window] * n
    return [None] * n


def kv_cache_bytes(config: Any, tokens: int, dtype_bytes: int = 2, batch_size: int = 1) -> int:
    """Bytes of keys and values for `tokens` tokens: 2 x kv_heads x head_dim x dtype per layer and token,
    each sliding-window layer capped at its window."""
    text = _text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = adapter_head_dim(text)
    per_token = 2 * kv_heads * head_dim * dtype_bytes
    return batch_size * sum(per_token * min(tokens, w or tokens) for w in layer_windows(config))


def activation_bytes(config: Any, tokens: int, dtype_bytes: int, batch_size: int = 1) -> int:
    """Peak working memory of one prefill over `tokens`: one layer's eager attention scores (float32 scores
    and probabilities in the compute dtype; gpt-oss runs eager attention) plus the logits of the last
    position (generate keeps only those; a trace's full logits are counted by the trace budget)."""
    text = _text_config(config)
    logits = text.vocab_size * 4
    scores = text.num_attention_heads * tokens * tokens * (4 + dtype_bytes)
    return batch_size * (logits + scores)
