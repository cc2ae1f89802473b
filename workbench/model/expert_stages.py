"""Inside the experts: each expert's input rows, gated activation and output, on the path the model really runs.

transformers computes all experts of a layer in one fused call (`grouped_mm`, `batched_mm`, or the class's eager
loop), so there is no per-expert module to hook. While a tool asks for an expert point, the experts of the model
run a copy of the same implementation that calls `stage(...)` between its steps:

    in   the rows routed to an expert (the gathered hidden states)
    act  after the gate (the input of the down projection)
    out  after the down projection and its bias, before the routing weight

The copies do the same operations in the same order on the same tensors, so the model's output is bit-identical
with and without them (tests/test_hook_points.py checks it for each implementation). The packed MXFP4 experts
(workbench/model/mxfp4_packed.py) call `stage` themselves. Other implementations (deepgemm, sonicmoe,
transformers' native MXFP4 kernels) are refused by name: there is nothing between their steps to read.

`stage` hands the tensor of all (token, expert) rows of this forward to the callable an inspector registered
on the experts module (`STAGES_ATTR`), with each row's expert and token; without one it returns it unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from workbench.errors import HookPointError
from workbench.model import compat

STAGES_ATTR = "_workbench_expert_stages"  # on an experts module: fn(stage, x, expert_of_row, token_of_row) -> x
PREFIX = "workbench_stages_"


def stage(module: nn.Module, name: str, x: torch.Tensor, expert_of_row: torch.Tensor,
          token_of_row: torch.Tensor) -> torch.Tensor:
    fn = module.__dict__.get(STAGES_ATTR)
    return x if fn is None else fn(name, x, expert_of_row, token_of_row)


# ---- the copies: transformers.integrations.moe's implementations with stage() between the steps -------------
def grouped_mm_stages(self, hidden_states, top_k_index, top_k_weights):
    _grouped_linear = compat.grouped_linear()
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    token_of_row = perm // num_top_k
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    if self.has_gate:
        selected_weights = self.gate_up_proj
        selected_biases = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
    else:
        selected_weights = self.up_proj
        selected_biases = self.up_proj_bias[expert_ids_g] if self.has_bias else None
    selected_hidden_states_g = stage(self, "in", selected_hidden_states_g, expert_ids_g, token_of_row)
    proj_out = _grouped_linear(selected_hidden_states_g, selected_weights, offsets, bias=selected_biases,
                               is_transposed=self.is_transposed)
    proj_out = self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)
    proj_out = stage(self, "act", proj_out, expert_ids_g, token_of_row)
    selected_biases = self.down_proj_bias[expert_ids_g] if self.has_bias else None
    proj_out = _grouped_linear(proj_out, self.down_proj, offsets, bias=selected_biases, is_transposed=self.is_transposed)
    if self.has_post_expert_norm:
        proj_out = self.post_expert_norm(proj_out)
    proj_out = stage(self, "out", proj_out, expert_ids_g, token_of_row)
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


def batched_mm_stages(self, hidden_states, top_k_index, top_k_weights):
    _batched_linear = compat.batched_linear()
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    token_of_row = torch.arange(expert_ids.numel(), device=expert_ids.device) // num_top_k
    if self.has_gate:
        selected_weights = self.gate_up_proj[expert_ids]
        selected_biases = self.gate_up_proj_bias[expert_ids] if self.has_bias else None
    else:
        selected_weights = self.up_proj[expert_ids]
        selected_biases = self.up_proj_bias[expert_ids] if self.has_bias else None
    selected_hidden_states = stage(self, "in", selected_hidden_states, expert_ids, token_of_row)
    proj_out = _batched_linear(selected_hidden_states, selected_weights, bias=selected_biases,
                               is_transposed=self.is_transposed)
    proj_out = self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)
    proj_out = stage(self, "act", proj_out, expert_ids, token_of_row)
    selected_weights = self.down_proj[expert_ids]
    selected_biases = self.down_proj_bias[expert_ids] if self.has_bias else None
    proj_out = _batched_linear(proj_out, selected_weights, bias=selected_biases, is_transposed=self.is_transposed)
    if self.has_post_expert_norm:
        proj_out = self.post_expert_norm(proj_out)
    proj_out = stage(self, "out", proj_out, expert_ids, token_of_row)
    weighted_out = proj_out * sample_weights.unsqueeze(-1)
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


def eager_stages(self, hidden_states, top_k_index, top_k_weights):
    """The classes' own eager loop (GptOssExperts: x @ W + b and its clamped gate; Mixtral, Qwen-MoE, OLMoE:
    F.linear and act(gate) * up), one expert at a time."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        ids = expert_idx.expand(token_idx.shape)
        current_state = stage(self, "in", hidden_states[token_idx], ids, token_idx)
        if self.is_transposed:  # GptOssExperts
            gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
            current = stage(self, "act", self._apply_gate(gate_up), ids, token_idx)
            out = current @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
        else:
            gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = stage(self, "act", self.act_fn(gate) * up, ids, token_idx)
            out = nn.functional.linear(current, self.down_proj[expert_idx])
        out = stage(self, "out", out, ids, token_idx)
        weighted = out * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, weighted.to(final_hidden_states.dtype))
    return final_hidden_states


COPIES = {"grouped_mm": grouped_mm_stages, "batched_mm": batched_mm_stages, "eager": eager_stages}
_EAGER_CLASSES = ("GptOssExperts", "MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts")


def _register() -> None:
    for name, fn in COPIES.items():
        compat.register_experts_function(PREFIX + name, fn)


def enable(experts: nn.Module, on_stage: Callable, preset: str | None = None) -> Callable[[], None]:
    """Route `experts`' stages to `on_stage` until the returned undo is called; HookPointError where this path has
    no steps to read (naming the implementation and what to load instead)."""
    if hasattr(experts, "dequantized"):  # PackedMxfp4Experts: calls stage() itself
        return _attach(experts, on_stage)
    config = getattr(experts, "config", None)
    implementation = getattr(config, "_experts_implementation", None) if config is not None else None
    if config is None or not hasattr(experts, "has_gate"):
        raise HookPointError(
            f"per-expert points cannot reach inside {type(experts).__name__}"
            + (f" (preset {preset!r})" if preset else "") + ": it computes all experts in one fused kernel with "
            "nothing between its steps. Load the model with preset 'bf16' (or the packed 'mxfp4' path on a CPU) to "
            "read expert activations; routing points (blocks.L.mlp.router.*) work on every preset.")
    implementation = implementation or "eager"
    base = implementation.removeprefix(PREFIX)
    if base not in COPIES or (base == "eager" and type(experts).__name__ not in _EAGER_CLASSES):
        raise HookPointError(
            f"per-expert points need the experts implementation 'grouped_mm', 'batched_mm' or 'eager'; this model "
            f"runs {implementation!r}. Load it with experts_implementation='grouped_mm' to read inside the experts.")
    _register()
    restore = compat.set_experts_implementation(config, PREFIX + base)
    detach = _attach(experts, on_stage)

    def undo() -> None:
        detach()
        restore()
    return undo


def _attach(experts: nn.Module, on_stage: Callable) -> Callable[[], None]:
    previous = experts.__dict__.get(STAGES_ATTR)

    def chained(name, x, expert_of_row, token_of_row):
        if previous is not None:
            x = previous(name, x, expert_of_row, token_of_row)
        return on_stage(name, x, expert_of_row, token_of_row)

    experts.__dict__[STAGES_ATTR] = chained

    def undo() -> None:
        if previous is None:
            experts.__dict__.pop(STAGES_ATTR, None)
        else:
            experts.__dict__[STAGES_ATTR] = previous
    return undo
