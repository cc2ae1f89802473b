"""One head's attention pattern as a heatmap: queries down, keys across, the sink as its own column.

    attention_heatmap(t, layer=3, head=2)                 # up to 256 queries: the last 256 beyond that
    attention_heatmap(t, 3, 2, window=(0, 64))            # queries 0..63

Cells are t.attention(layer, head) exactly. Keys a query cannot see (the future, or outside a sliding
window) are left blank rather than drawn as 0, so the causal triangle and the window's band show. When
the queries are windowed, the keys are the same positions, and one "≺ earlier" column holds the total
probability each query gives to the keys before the window (so every row still adds up to 1).
"""
from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from workbench.views import _common as c
from workbench.views.labels import token_labels

SINK = "⟂ sink"


def layer_kind(t, layer: int) -> str:
    """'sliding window 128' or 'full attention', from the trace's metadata."""
    w = t.attention_info(layer).window
    return f"sliding window {w}" if w is not None else "full attention"


def attention_heatmap(t, layer: int, head: int, *, window=None) -> go.Figure:
    """Heatmap of one head's attention probabilities (rows: queries, columns: keys, plus the sink column).

    window: None (all tokens up to 256, else the last 256 queries), an int n (the last n queries) or a
    (start, stop) pair of query positions. Hover shows query, key and probability.
    """
    layer, head = c.attention_layer(t, layer), c.attention_head(t, head)
    n = len(t.tokens)
    start, stop, note = c.window(n, window, unit="queries")
    probs = t.attention(layer, head)[start:stop]  # [queries, all keys]
    sliding = t.attention_info(layer).window
    offset = t.attention_info(layer).offset

    i = torch.arange(start, stop)[:, None] + offset  # query positions among the keys (offset 0 without cache)
    j = torch.arange(start, stop)[None, :]
    seen = (j <= i) & ((j > i - sliding) if sliding is not None else True)
    columns = [probs[:, start:stop].masked_fill(~seen, math.nan)]
    x = token_labels(t, range(start, stop))
    y = list(x)
    if start > 0:  # everything left of the window, summed, so rows keep adding up to 1
        x = [f"≺ earlier (0–{start - 1})"] + x
        columns.insert(0, probs[:, :start].sum(dim=1, keepdim=True))
    sinks = t.has_sinks(layer)
    if sinks:
        x = x + [SINK]
        columns.append(t.sink_mass_at(layer, head)[start:stop, None])
    z = torch.cat(columns, dim=1).numpy()  # numpy: plotly sends it as compact binary, not JSON text

    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, **c.PROBABILITY, colorbar=dict(title="probability"), hoverongaps=False,
        hovertemplate="query %{y}<br>key %{x}<br>probability %{z:.4f}<extra></extra>"))
    fig.update_xaxes(title="key (the token attended to)", type="category", tickangle=-60)
    fig.update_yaxes(title="query (the token attending)", type="category", autorange="reversed")
    # Thin lines set the summed "earlier" column and the sink column apart from real keys.
    edges = ([0.5] if start > 0 else []) + ([len(x) - 1.5] if sinks else [])
    for edge in edges:
        fig.add_vline(x=edge, line=dict(color="#555", width=1))
    kv = head // t.groups
    how = ("each row: where that token looks; blank = masked" +
           (f"; '{SINK}' = probability the learned sink absorbs" if sinks else ""))
    c.title(fig, t, f"Layer {layer} · head {head} (KV head {kv}) · {layer_kind(t, layer)}", note, how)
    fig.update_layout(height=c.axis_height(len(y)))
    return fig

