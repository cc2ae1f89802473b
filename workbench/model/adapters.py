"""One table of architectures: where the parts of a model live and how it routes.

Capture, planning and reporting code reads this table instead of special-casing models.
An architecture that is not in the table is treated as a dense llama-like model, with a note.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from workbench.errors import AdapterError


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to find things inside one family of Hugging Face causal LMs."""

    family: str  # a readable name: "gpt-oss", "mixtral", ...
    model_types: tuple[str, ...]  # config.model_type values this row covers
    layers: str = "model.layers"  # attribute path from the CausalLM to the decoder layer list
    final_norm: str = "model.norm"  # attribute path to the norm applied before lm_head (the logit lens uses it)
    attention: str = "self_attn"  # attribute of a layer
    mlp: str = "mlp"  # attribute of a layer
    router: str | None = None  # attribute of the MLP holding the router weight (None: dense)
    experts: str | None = None  # attribute of the MLP holding the experts
    num_experts_key: str | None = None  # config key for the number of routed experts
    top_k_key: str | None = None  # config key for experts per token
    # "topk_softmax": top-k of the logits, softmax over those k (gpt-oss);
    # "softmax_topk": softmax over all experts, then top-k (Mixtral, Qwen, OLMoE).
    routing: str | None = None
    renormalize: bool | str = False  # True, False, or a config key (e.g. "norm_topk_prob")
    router_has_bias: bool = False
    weights_in_logits_dtype: bool = False  # Qwen-MoE/OLMoE cast top-k weights back to the logits' dtype
    has_sinks: bool = False  # learned attention-sink logit per head (gpt-oss)
    shared_expert: str | None = None  # attribute of the MLP holding an always-on expert (Qwen2-MoE)
    # Attributes of the MLP that decide routing: the router and any gate. Quantizers leave them alone,
    # since quantizing a router changes which experts run, which is what a user of this workbench studies.
    gates: tuple[str, ...] = ()
    # Regular expressions over parameter names, checked in order; the first match names the group.
    groups: tuple[tuple[str, str], ...] = (
        ("experts", r"\.experts\."),
        ("router", r"\.(router|gate)\.weight$|\.(router)\.bias$"),
        ("attention", r"\.self_attn\."),
        ("embeddings", r"embed_tokens|lm_head|wte|wpe"),
    )

    @property
    def is_moe(self) -> bool:
        return self.router is not None

    # ---- reading a config -------------------------------------------------------------
    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_key)) if self.num_experts_key else 0

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_key)) if self.top_k_key else 0

    def renormalizes(self, config: Any) -> bool:
        if isinstance(self.renormalize, str):
            return bool(getattr(config, self.renormalize, False))
        return bool(self.renormalize)

    def group_of(self, parameter_name: str) -> str:
        """Which parameter group ("experts", "router", "attention", "embeddings", "other") a name is in."""
        if self.gates and re.search(rf"\.{re.escape(self.mlp)}\.({'|'.join(map(re.escape, self.gates))})\.",
                                    parameter_name):
            return "router"
        for group, pattern in self.groups:
            if re.search(pattern, parameter_name):
                return group
        return "other"

    # ---- reading a model --------------------------------------------------------------
    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return _get_attr(model, self.layers)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return _get_attr(model, self.final_norm)

    def attention_module(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.layer_list(model)[layer], self.attention)

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.layer_list(model)[layer], self.mlp)

    def gate_module_patterns(self) -> list[str]:
        """Regular expressions naming every router and gate module, in the form transformers' quantizers
        take (`llm_int8_skip_modules`, `modules_to_not_convert`): e.g. `model\\.layers\\.\\d+\\.mlp\\.router`."""
        return [rf"{re.escape(self.layers)}\.\d+\.{re.escape(self.mlp)}\.{re.escape(g)}" for g in self.gates]

    def moe_layers(self, model: nn.Module) -> list[int]:
        """Indices of layers whose MLP is routed (Qwen-MoE can mix dense and sparse layers)."""
        if not self.is_moe:
            return []
        return [i for i, layer in enumerate(self.layer_list(model)) if hasattr(getattr(layer, self.mlp), self.router)]

    def router_parameters(self, model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [experts, hidden], bias or None) of a layer's router, whatever module holds them."""
        router = getattr(self.mlp_module(model, layer), self.router)
        return router.weight, getattr(router, "bias", None)

    def route(self, router_logits: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices and applied weights from router logits, with the model's own arithmetic.

        Mirrors the transformers router modules line for line so that captured routing equals what
        the model computed, on every preset (the mxfp4 path computes logits but never calls the router).
        """
        k = self.top_k(config)
        if self.routing == "topk_softmax":
            top_values, indices = torch.topk(router_logits, k, dim=-1)
            weights = torch.softmax(top_values, dim=-1, dtype=top_values.dtype)
        elif self.routing == "softmax_topk":
            probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
            weights, indices = torch.topk(probs, k, dim=-1)
            if self.renormalizes(config):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.weights_in_logits_dtype:
                weights = weights.to(router_logits.dtype)
        else:
            raise AdapterError(f"this model (family {self.family!r}) is not a routed (MoE) architecture: it has no "
                               "routing to compute")
        return indices, weights

    def weights_for(self, router_logits: torch.Tensor, indices: torch.Tensor, config: Any) -> torch.Tensor:
        """The weights the model would give experts `indices` (chosen by someone else) from these logits: its own
        arithmetic over them, as `route` applies it to its own choice."""
        if self.routing == "topk_softmax":
            values = router_logits.gather(-1, indices)
            return torch.softmax(values, dim=-1, dtype=values.dtype)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float).gather(-1, indices)
        if self.renormalizes(config):
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs.to(router_logits.dtype) if self.weights_in_logits_dtype else probs


def text_config(config: Any) -> Any:
    """The decoder's config: a multimodal config's text part, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config: Any) -> int:
    """The attention head width: the config's head_dim when it has one (gpt-oss, Gemma, Qwen3), else hidden/heads.
    The one rule the workbench uses (transformers' attention modules compute it the same way)."""
    config = text_config(config)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embeddings' device (accelerate may spread the rest)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _get_attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


LLAMA_LIKE = Adapter(
    family="dense",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
                 "granite", "smollm3", "stablelm"),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="gpt-oss", model_types=("gpt_oss",), router="router", experts="experts",
        num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", routing="topk_softmax",
        router_has_bias=True, has_sinks=True, gates=("router",),
    ),
    Adapter(
        family="mixtral", model_types=("mixtral",), router="gate", experts="experts",
        num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", routing="softmax_topk",
        renormalize=True, gates=("gate",),
    ),
    Adapter(
        family="qwen-moe", model_types=("qwen2_moe", "qwen3_moe"), router="gate", experts="experts",
        num_experts_key="num_experts", top_k_key="num_experts_per_tok", routing="softmax_topk",
        renormalize="norm_topk_prob", shared_expert="shared_expert", weights_in_logits_dtype=True,
        gates=("gate", "shared_expert_gate"),  # Qwen2-MoE's always-on shared expert has its own sigmoid gate
        groups=(("experts", r"\.experts\.|\.shared_expert\."),) + LLAMA_LIKE.groups[1:],
    ),
    Adapter(
        family="olmoe", model_types=("olmoe",), router="gate", experts="experts",
        num_experts_key="num_experts", top_k_key="num_experts_per_tok", routing="softmax_topk",
        renormalize="norm_topk_prob", weights_in_logits_dtype=True, gates=("gate",),
    ),
    LLAMA_LIKE,
)


def adapter_for(config: Any) -> tuple[Adapter, str]:
    """The adapter for a config, and a note ("" when the architecture is known)."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter, ""
    return LLAMA_LIKE, (
        f"architecture {model_type!r} is not in the adapter table; treating it as a dense model "
        "(generation and attention capture work if it uses model.layers[i].self_attn; no routing capture)"
    )
