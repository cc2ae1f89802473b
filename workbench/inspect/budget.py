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


def spec_bytes(spec: CaptureSpec, tokens: int, rows: int = 1) -> dict[str, int]:
    """{"attention", "routing", "residuals", "points", "stored", "forward", "total"} bytes of a trace of `rows`
    sequences of `tokens` tokens under `spec`: what the trace keeps, and the forward's own peak while it runs."""
    per_row, tokens = tokens, tokens * rows
    size = torch.finfo(spec.storage_dtype).bits // 8
    value_size = torch.finfo(spec.value_dtype or spec.model_dtype).bits // 8
    out = {"attention": 0, "routing": 0, "residuals": 0, "points": 0}
    if "attention" in spec.what:
        out["attention"] = tokens * len(spec.layers) * (len(spec.heads) + len(spec.kv_heads)) * spec.head_dim * size
    if "routing" in spec.what:
        e, k = spec.num_experts, spec.top_k
        out["routing"] = tokens * len(spec.routed_layers) * (e * 4 + k * 8 + k * 4)
    if "residuals" in spec.what:
        out["residuals"] = tokens * len(spec.layers) * spec.hidden_size * value_size
    out["points"] = points_bytes(spec, tokens, value_size)
    out["stored"] = sum(out.values())
    out["forward"] = rows * forward_bytes(spec, per_row)
    out["total"] = out["stored"] + out["forward"]
    return out


def points_bytes(spec: CaptureSpec, tokens: int, size: int) -> int:
    """Hook points recorded through taps: per token and point, its width; an expert's rows are at most the tokens, and
    a layer's experts together hold tokens x top_k rows per stage."""
    widths = {"resid_pre": spec.hidden_size, "resid_mid": spec.hidden_size, "resid_post": spec.hidden_size,
              "attn.out": spec.hidden_size, "mlp.out": spec.hidden_size, "attn.q": spec.num_heads * spec.head_dim,
              "attn.z": spec.num_heads * spec.head_dim, "attn.k": spec.num_kv_heads * spec.head_dim,
              "attn.v": spec.num_kv_heads * spec.head_dim}
    total, experts = 0, {}
    for p in spec.resolved_points():
        if p.key == "logits":
            total += tokens * spec.vocab_size * 4
        elif p.expert is not None:
            experts.setdefault((p.layer, p.stage), []).append(p.expert)
        else:
            total += tokens * widths[p.key] * size
    for (layer, stage), named in experts.items():
        rows = min(len(named) * tokens, max(spec.top_k, 1) * tokens)
        total += rows * (spec.expert_width if stage == "act" else spec.hidden_size) * size + rows * 8  # + positions
    return total


def forward_bytes(spec: CaptureSpec, tokens: int) -> int:
    """Estimate (not a measurement) of one sequence's forward peak under no_grad: the residual stream and one layer's
    attention and MLP intermediates, the eager attention probabilities (heads x tokens x tokens in float32; other
    attention kernels do not keep them), and the float32 logits of every position."""
    element = spec.model_dtype.itemsize
    inter = spec.expert_width or 4 * spec.hidden_size
    per_token = (4 * spec.hidden_size + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                 + 2 * max(spec.top_k, 1) * inter)
    attention = spec.num_heads * tokens * tokens * 4 if spec.eager_attention else 0
    return tokens * per_token * element + attention + tokens * spec.vocab_size * 4


def trace_bytes(config, adapter: Adapter | None = None, tokens: int = 1, what=("routing", "attention"),
                layers=None, heads=None, dtype: torch.dtype = torch.bfloat16, moe_layers=None) -> dict[str, int]:
    """Bytes a trace needs, from a config alone (no weights, no download)."""
    spec = CaptureSpec.from_config(config, adapter, what, layers, heads, dtype, moe_layers=moe_layers)
    return spec_bytes(spec, tokens)


def check_budget(spec: CaptureSpec, tokens: int, budget, rows: int = 1) -> None:
    """Raise CaptureBudgetError, naming cheaper requests that fit, when the trace and its forward would exceed
    `budget` (`rows` sequences of `tokens` tokens)."""
    if budget is None:
        return
    limit = parse_budget(budget)
    sizes = spec_bytes(spec, tokens, rows)
    need = sizes["total"]
    if need <= limit:
        return

    def size(**changes) -> int:
        return spec_bytes(spec.replace(**changes), tokens, rows)["total"]

    options = []
    if "routing" in spec.what and len(spec.what) > 1:
        options.append(f"routing only (what=['routing']): {format_bytes(size(what=('routing',)))}")
    if "attention" in spec.what:
        fit = next((n for n in range(len(spec.layers) - 1, 0, -1)
                    if size(what=("attention",), layers=spec.layers[:n]) <= limit), 0)
        if 1 <= fit < len(spec.layers):
            few = spec.layers[:fit]
            options.append(f"attention on {fit} layer(s) (layers={few if fit <= 4 else f'{few[:2]}...'}): "
                           f"{format_bytes(size(what=('attention',), layers=few))}")
        if len(spec.heads) > 1:
            options.append(f"attention for one head per layer (heads=[{spec.heads[0]}]): "
                           f"{format_bytes(size(what=('attention',), heads=spec.heads[:1]))}")
    if "residuals" in spec.what and len(spec.what) > 1:
        options.append("without residuals: " + format_bytes(size(what=tuple(w for w in spec.what if w != "residuals"))))
    if spec.points:
        options.append("fewer hook points: " + format_bytes(size(points=())) + " without them")
    fit_tokens = next((n for n in _halvings(tokens) if spec_bytes(spec, n, rows)["total"] <= limit), 0)
    per_token = need / tokens
    if fit_tokens >= 1:
        options.append(f"the same request on the first {fit_tokens} tokens")
    else:
        options.append(f"no number of tokens fits: one token alone needs {format_bytes(per_token)}")
    raise CaptureBudgetError(
        f"This trace needs {format_bytes(need)}: {format_bytes(sizes['stored'])} kept + ~{format_bytes(sizes['forward'])} "
        f"while the forward runs ({rows * tokens} tokens, {len(spec.layers)} layers "
        f"({format_indices(spec.layers)}), {len(spec.heads)} heads, {', '.join(spec.what)}, "
        f"{str(spec.storage_dtype).removeprefix('torch.')}), over the budget of {format_bytes(limit)}. "
        "Cheaper requests: " + "; ".join(options) + f". Or raise the budget (budget='{_suggest(need)}').")


def _halvings(n: int):
    while n > 1:
        n //= 2
        yield n


def _suggest(need: int) -> str:
    """A round budget above `need`, as a user would type it."""
    gb = need / 1e9
    if gb >= 1:
        return f"{int(gb) + 1}GB"
    return f"{int(need / 1e6) + 1}MB"
