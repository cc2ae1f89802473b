"""How experts relate: where a token's top expert at one layer sends it at the next (Sankey), and which
experts are chosen together for the same token (co-activation).

    expert_flow(t, layers=(0, 1))   # or a longer chain: layers=(0, 1, 2, 3)
    coactivation(t, layer=0)
"""
from __future__ import annotations

from collections import Counter

import plotly.colors
import plotly.graph_objects as go
import torch

from workbench.views import _common as c


def top1(t) -> torch.Tensor:
    """[routed layers, tokens] int64: the expert with the largest applied weight (first on ties)."""
    r = c.routing(t)
    return r.indices.gather(-1, r.weights.float().argmax(-1, keepdim=True)).squeeze(-1)


def transitions(t, a: int, b: int) -> Counter:
    """Counter {(expert at layer a, expert at layer b): tokens} of top-1 experts."""
    top, rows = top1(t), (c.routing_layer(t, a), c.routing_layer(t, b))
    return Counter(zip(top[rows[0]].tolist(), top[rows[1]].tolist()))


def coactivation_counts(t, layer: int) -> torch.Tensor:
    """[experts, experts] int64: tokens that chose both experts i and j (the diagonal: tokens that chose i)."""
    r, row = c.routing(t), c.routing_layer(t, layer)
    chosen = torch.zeros(r.indices.shape[1], c.num_experts(t), dtype=torch.int64)
    chosen.scatter_(1, r.indices[row], 1)
    return chosen.T @ chosen


def expert_flow(t, layers=None) -> go.Figure:
    """Sankey of each token's top-1 expert from layer to layer (default: the first two MoE layers)."""
    r = c.routing(t)
    if layers is None:
        layers = r.layers[:2]
    layers = [r.layers[c.routing_layer(t, layer)] for layer in layers]
    if len(layers) < 2 or len(set(layers)) != len(layers):
        raise c.CaptureError(f"layers={layers}: give two or more different MoE layers, e.g. layers=(a, b) from "
                             f"{c.span(r.layers)}.")
    top, palette = top1(t), plotly.colors.qualitative.Plotly
    nodes: dict[tuple[int, int], int] = {}  # (layer, expert) -> node number
    for layer in layers:
        for e in sorted(set(top[r.layers.index(layer)].tolist())):
            nodes[layer, e] = len(nodes)
    source, target, value, color = [], [], [], []
    for a, b in zip(layers, layers[1:]):
        for (ea, eb), n in sorted(transitions(t, a, b).items()):
            source.append(nodes[a, ea])
            target.append(nodes[b, eb])
            value.append(n)
            color.append(_fade(palette[ea % len(palette)]))
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node=dict(label=[f"L{layer} · e{e}" for layer, e in nodes], pad=8, thickness=14,
                  color=[palette[e % len(palette)] for _, e in nodes],
                  hovertemplate="%{label}: %{value} tokens<extra></extra>"),
        link=dict(source=source, target=target, value=value, color=color,
                  hovertemplate="%{source.label} → %{target.label}: %{value} tokens<extra></extra>")))
    c.title(fig, t, f"Top-1 expert flow · layers {' → '.join(map(str, layers))} · {len(t.tokens)} tokens",
            "each band: tokens whose strongest expert was the left one at one layer and the right one at the next")
    fig.update_layout(height=max(420, 18 * max(Counter(layer for layer, _ in nodes).values())))
    return fig


def coactivation(t, layer: int) -> go.Figure:
    """Expert x expert heatmap: how many tokens chose both experts at `layer` (diagonal left blank: it is
    just each expert's load, see expert_load)."""
    r = c.routing(t)
    layer = r.layers[c.routing_layer(t, layer)]
    counts = coactivation_counts(t, layer).float()
    z = counts.clone()
    z.fill_diagonal_(float("nan"))
    experts = [f"expert {e}" for e in range(counts.shape[0])]
    k = r.indices.shape[-1]
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=experts, y=experts, **c.COUNT, colorbar=dict(title="tokens"),
                               hoverongaps=False,
                               hovertemplate="%{y} & %{x}: %{z:.0f} tokens<extra></extra>"))
    fig.update_xaxes(title="expert", type="category")
    fig.update_yaxes(title="expert", type="category", autorange="reversed", scaleanchor="x")
    c.title(fig, t, f"Layer {layer} · expert co-activation · top-{k} · {len(t.tokens)} tokens",
            "cell (i, j): tokens that went to both i and j; diagonal blank (it is the expert's load)"
            + ("; top-1 routing never co-activates" if k == 1 else ""))
    fig.update_layout(height=c.axis_height(counts.shape[0], per_row=20, lo=480))
    return fig


def _fade(color: str, alpha: float = 0.35) -> str:
    """'#636efa' -> 'rgba(99, 110, 250, 0.35)': links tinted by their source expert, see-through."""
    r, g, b = plotly.colors.hex_to_rgb(color)
    return f"rgba({r}, {g}, {b}, {alpha})"
