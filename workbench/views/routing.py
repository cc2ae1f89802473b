"""Mixture-of-experts routing: which experts each token went to, how evenly, and how sure the router was.

    expert_heatmap(t, layer)     # token x expert, the weights the model applied (0 where not chosen)
    expert_load(t)               # share of tokens per expert, one layer at a time (slider), vs uniform k/E
    routing_entropy(t)           # layers x tokens: entropy of the router's softmax over all experts

Layers are model layer numbers (t.routing.layers: MoE layers only, e.g. [0, 2] when layer 1 is dense).
Flows between layers and co-activation are in views/flow.py.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from workbench.metrics import entropy_bits_from_logits
from workbench.views import _common as c
from workbench.views.labels import token_labels


# ---- the numbers (plain tensors, reused by the figures and easy to test) -------------------------------------
def expert_weights(t, layer: int) -> torch.Tensor:
    """[tokens, experts] float32: each token's applied weight on each expert, 0 for experts not chosen."""
    r, row = c.routing(t), c.routing_layer(t, layer)
    out = torch.zeros(r.indices.shape[1], c.num_experts(t))
    return out.scatter_(1, r.indices[row], r.weights[row].float())


def expert_counts(t) -> torch.Tensor:
    """[routed layers, experts] int64: how many tokens chose each expert (among their top k)."""
    r = c.routing(t)
    counts = torch.zeros(len(r.layers), c.num_experts(t), dtype=torch.int64)
    return counts.scatter_add_(1, r.indices.flatten(1), torch.ones_like(r.indices.flatten(1)))


def router_entropy(t) -> torch.Tensor:
    """[routed layers, tokens] float32: entropy in bits of softmax(router logits) over all experts."""
    return entropy_bits_from_logits(c.routing(t).logits)


# ---- the figures ----------------------------------------------------------------------------------------------
def expert_heatmap(t, layer: int, *, window=None) -> go.Figure:
    """Token x expert heatmap of the routing weights at `layer` (0 where an expert was not chosen).

    window: None (all tokens up to 256, else the last 256), an int n (the last n) or (start, stop).
    """
    r = c.routing(t)
    layer = r.layers[c.routing_layer(t, layer)]
    start, stop, note = c.window(len(t.tokens), window)
    z = expert_weights(t, layer)[start:stop]
    k, n_experts = r.indices.shape[-1], z.shape[1]
    y = token_labels(t, range(start, stop))
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=[f"expert {e}" for e in range(n_experts)], y=y,
        **{**c.PROBABILITY, "zmax": max(1.0, float(z.max()))}, colorbar=dict(title="weight"),
        hovertemplate="token %{y}<br>%{x}<br>weight = %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title="expert", type="category", side="top")
    fig.update_yaxes(title="token", type="category", autorange="reversed")
    c.title(fig, t, f"Layer {layer} · routing weights · top-{k} of {n_experts} experts", note,
            f"each row: the {k} experts that token went to, and how much each counted (white = not chosen, weight 0)")
    fig.update_layout(height=c.axis_height(len(y)), margin=dict(t=fig.layout.margin.t + c.TOP_AXIS))  # x axis on top
    return fig


def expert_load(t) -> go.Figure:
    """Share of tokens sent to each expert, one bar chart per MoE layer (pick with the slider), against the
    share every expert would get under perfectly even routing (k/E)."""
    r = c.routing(t)
    counts, n_tokens = expert_counts(t), len(t.tokens)
    k, n_experts = r.indices.shape[-1], counts.shape[1]
    experts = [f"expert {e}" for e in range(n_experts)]
    fig = go.Figure()
    for row, layer in enumerate(r.layers):
        fig.add_trace(go.Bar(x=experts, y=(counts[row] / n_tokens).tolist(), customdata=counts[row].tolist(),
                             name=f"layer {layer}", visible=row == 0, marker_color="#3b75af",
                             hovertemplate="%{x}: %{customdata} of " + f"{n_tokens} tokens" +
                                           " (%{y:.1%})<extra>layer " + f"{layer}</extra>"))
    uniform = k / n_experts
    fig.add_hline(y=uniform, line_dash="dash", line_color="#c0392b",
                  annotation_text=f"uniform k/E = {k}/{n_experts} = {uniform:.3f}", annotation_position="top left")
    steps = [dict(method="restyle", label=str(layer), args=[{"visible": [i == row for i in range(len(r.layers))]}])
             for row, layer in enumerate(r.layers)]
    fig.update_layout(sliders=[dict(steps=steps, currentvalue=dict(prefix="layer "), pad=dict(t=60))],
                      showlegend=False, bargap=0.15)
    fig.update_xaxes(title="expert", type="category")
    fig.update_yaxes(title="share of tokens routed here", range=[0, max(2 * uniform, float(counts.max()) / n_tokens)
                                                                 * 1.05], tickformat=".0%")
    c.title(fig, t, f"Expert load · {n_tokens} tokens · top-{k} of {n_experts} experts",
            "a token counts once for each of its k experts; bars above the dashed line are busier than even")
    return fig


def routing_entropy(t) -> go.Figure:
    """Layers x tokens heatmap: how unsure the router is about each token (bits, up to log2 of the experts)."""
    r = c.routing(t)
    z = router_entropy(t)
    n_experts = c.num_experts(t)
    top = math.log2(n_experts)
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=token_labels(t), y=[f"layer {layer}" for layer in r.layers], **c.ENTROPY, zmax=top,
        colorbar=dict(title="bits"), hovertemplate="%{y} · token %{x}<br>router entropy = %{z:.2f} bits"
                                                   "<extra></extra>"))
    fig.update_xaxes(title="token", type="category", tickangle=-60)
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    c.title(fig, t, f"Router entropy · {len(t.tokens)} tokens · {n_experts} experts",
            f"entropy of softmax(router logits): 0 bits = one expert certain; {top:.1f} bits = all {n_experts} "
            f"equally likely")
    fig.update_layout(height=c.axis_height(len(r.layers), per_row=28, lo=320))
    return fig
