"""Every head at once: layers x heads grids of sink mass or attention entropy, and sink mass along the text.

    head_grid(t)                    # mean sink mass of each head (gpt-oss)
    head_grid(t, metric="entropy")  # mean attention entropy in bits: low = focused, high = spread out
    sink_mass(t)                    # the sink grid, plus each layer's mean sink mass at each position
"""
from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.metrics import entropy_bits
from workbench.views import _common as c
from workbench.views.labels import token_labels

METRICS = ("sink_mass", "entropy")


def _layer_labels(t) -> list[str]:
    out = []
    for layer in t.attention_layers:
        w = t.attention_info(layer).window
        out.append(f"layer {layer} · " + (f"sliding {w}" if w is not None else "full"))
    return out


def _need_sinks(t) -> None:
    c.need_attention(t)
    if not any(t.has_sinks(layer) for layer in t.attention_layers):
        raise c.CaptureError(f"this trace has no attention sinks: sink mass is 0 everywhere. Sinks are learned "
                             f"per-head logits of gpt-oss; this model (family {t.family!r}) has none "
                             f"(try head_grid(t, metric='entropy')).")


def attention_entropy(t) -> torch.Tensor:
    """[layers, heads] mean over queries of each query's attention entropy in bits (the sink counts as one
    more place the probability can go)."""
    out = torch.zeros(len(t.attention_layers), len(t.heads))
    for row, layer in enumerate(t.attention_layers):
        for _, _, probs, sink in t.attention_blocks(layer):
            h = entropy_bits(probs)  # 0 log 0 = 0 for masked keys
            if sink is not None:
                h = h + entropy_bits(sink.unsqueeze(-1))
            out[row] += h.sum(-1)
    return out / len(t.tokens)


def head_grid(t, metric: str = "sink_mass") -> go.Figure:
    """Layers x heads heatmap of each head's mean sink mass, or mean attention entropy (metric="entropy")."""
    if metric not in METRICS:
        raise c.CaptureError(f"metric={metric!r}: choose one of {', '.join(METRICS)}.")
    c.need_attention(t)
    if metric == "sink_mass":
        _need_sinks(t)
        z, scale, what = t.sink_mass.mean(-1), c.PROBABILITY, "mean sink mass"
        how = "share of attention each head parks on its learned sink, averaged over all tokens"
    else:
        z, scale, what = attention_entropy(t), c.ENTROPY, "mean entropy (bits)"
        how = f"0 bits = always one key; log2(tokens) = {torch.log2(torch.tensor(float(len(t.tokens)))):.1f} " \
              f"bits = spread evenly over every earlier token"
    x, y = [f"head {h}" for h in t.heads], _layer_labels(t)
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=x, y=y, **scale, colorbar=dict(title=what.split(" (")[0]),
                               hovertemplate="%{y} · %{x}<br>" + what + " = %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title="head", type="category")
    fig.update_yaxes(title="layer", type="category", autorange="reversed")
    c.title(fig, t, f"{what.capitalize()} per head · {len(t.tokens)} tokens", how)
    fig.update_layout(height=c.axis_height(len(y), per_row=22))
    return fig


def sink_mass(t) -> go.Figure:
    """Sink mass by layer and head (top: mean over tokens) and by token position (bottom: mean over heads,
    one line per layer, dotted for sliding-window layers)."""
    _need_sinks(t)
    mass = t.sink_mass  # [layers, heads, tokens]
    y = _layer_labels(t)
    fig = make_subplots(rows=2, cols=1, row_heights=[0.45, 0.55], vertical_spacing=0.14,
                        subplot_titles=("by layer and head (mean over tokens)",
                                        "by position (mean over heads)"))
    fig.add_trace(go.Heatmap(z=mass.mean(-1).numpy(), x=[f"head {h}" for h in t.heads], y=y, **c.PROBABILITY,
                             colorbar=dict(title="sink mass", len=0.45, y=1.0, yanchor="top"),
                             hovertemplate="%{y} · %{x}<br>mean sink mass = %{z:.3f}<extra></extra>"),
                  row=1, col=1)
    labels = token_labels(t)
    for row, layer in enumerate(t.attention_layers):
        sliding = t.attention_info(layer).window is not None
        fig.add_trace(go.Scatter(x=list(range(len(t.tokens))), y=mass[row].mean(0).numpy(), name=y[row],
                                 mode="lines", line=dict(width=1.5, dash="dot" if sliding else "solid"),
                                 text=labels, hovertemplate="%{text}<br>sink mass = %{y:.3f}"), row=2, col=1)
    fig.update_xaxes(title="head", type="category", row=1, col=1)
    fig.update_yaxes(title="layer", type="category", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title="token position", row=2, col=1)
    fig.update_yaxes(title="sink mass", range=[0, 1], row=2, col=1)
    c.title(fig, t, f"Attention sink mass · {len(t.tokens)} tokens",
            "the probability each query gives the learned sink instead of any token")
    fig.update_layout(height=max(650, 2 * c.axis_height(len(y), per_row=22)), legend=dict(y=0.5, yanchor="top"),
                      margin=dict(t=fig.layout.margin.t + 30))  # room for the first panel's title too
    return fig
