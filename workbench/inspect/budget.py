"""Trace budgets: the bytes a capture request needs, from its spec alone, checked before any hook runs.

Attention keeps q for each requested head and k for the KV heads they read (T*d per head, never T*T);
routing keeps float32 logits, int64 indices and the applied weights (at most 4 bytes); residuals keep one
hidden vector per token and layer.
"""
from __future__ import annotations

import torch

from workbench.errors import CaptureBudgetError
from workbench.indices import format_indices
from workbench.inspect.spec import CaptureSpec
from workbench.model.adapters import Adapter
from workbench.sizes import format_bytes, parse_bytes


def parse_budget(budget) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    return parse_bytes(budget, what="budget", error=CaptureBudgetError)


def spec_bytes(spec: CaptureSpec, tokens: int) -> dict[str, int]:
    """{"attention", "routing", "residuals", "total"} bytes of a trace of `tokens` tokens under `spec`."""
    size = torch.finfo(spec.storage_dtype).bits // 8
    out = {"attention": 0, "routing": 0, "residuals": 0}
    if "attention" in spec.what:
        out["attention"] = tokens * len(spec.layers) * (len(spec.heads) + len(spec.kv_heads)) * spec.head_dim * size
    if "routing" in spec.what:
        e, k = spec.num_experts, spec.top_k
        out["routing"] = tokens * len(spec.routed_layers) * (e * 4 + k * 8 + k * 4)
    if "residuals" in spec.what:
        out["residuals"] = tokens * len(spec.layers) * spec.hidden_size * size
    out["total"] = sum(out.values())
    return out


def trace_bytes(config, adapter: Adapter | None = None, tokens: int = 1, what=("routing", "attention"),
                layers=None, heads=None, dtype: torch.dtype = torch.bfloat16, moe_layers=None) -> dict[str, int]:
    """Bytes a trace needs, from a config alone (no weights, no download)."""
    spec = CaptureSpec.from_config(config, adapter, what, layers, heads, dtype, moe_layers=moe_layers)
    return spec_bytes(spec, tokens)


def check_budget(spec: CaptureSpec, tokens: int, budget) -> None:
    """Raise CaptureBudgetError, naming cheaper requests that fit, when the trace would exceed `budget`."""
    if budget is None:
        return
    limit = parse_budget(budget)
    need = spec_bytes(spec, tokens)["total"]
    if need <= limit:
        return

    def size(**changes) -> int:
        return spec_bytes(spec.replace(**changes), tokens)["total"]

    options = []
    if "routing" in spec.what and len(spec.what) > 1:
        options.append(f"routing only (what=['routing']): {format_bytes(size(what=('routing',)))}")
    if "attention" in spec.what:
        per_layer = size(what=("attention",), layers=spec.layers[:1])
        fit = int(limit // max(per_layer, 1))
        if 1 <= fit < len(spec.layers):
            few = spec.layers[:fit]
            options.append(f"attention on {fit} layer(s) (layers={few if fit <= 4 else f'{few[:2]}...'}): "
                           f"{format_bytes(size(what=('attention',), layers=few))}")
        if len(spec.heads) > 1:
            options.append(f"attention for one head per layer (heads=[{spec.heads[0]}]): "
                           f"{format_bytes(size(what=('attention',), heads=spec.heads[:1]))}")
    if "residuals" in spec.what and len(spec.what) > 1:
        options.append("without residuals: " + format_bytes(size(what=tuple(w for w in spec.what if w != "residuals"))))
    per_token = need / tokens
    fit_tokens = int(limit // per_token)
    if fit_tokens >= 1:
        options.append(f"the same request on the first {fit_tokens} tokens")
    else:
        options.append(f"no number of tokens fits: one token alone needs {format_bytes(per_token)}")
    raise CaptureBudgetError(
        f"This trace needs {format_bytes(need)} ({tokens} tokens, {len(spec.layers)} layers "
        f"({format_indices(spec.layers)}), {len(spec.heads)} heads, {', '.join(spec.what)}, "
        f"{str(spec.storage_dtype).removeprefix('torch.')}), over the budget of {format_bytes(limit)}. "
        "Cheaper requests: " + "; ".join(options) + f". Or raise the budget (budget='{_suggest(need)}').")


def _suggest(need: int) -> str:
    """A round budget above `need`, as a user would type it."""
    gb = need / 1e9
    if gb >= 1:
        return f"{int(gb) + 1}GB"
    return f"{int(need / 1e6) + 1}MB"
