"""Logit lens as a grid: what the model would predict next if it stopped after each layer.

    logit_lens_grid(t, s.model, s.tokenizer)            # needs a trace with what=[..., "residuals"]

Each cell (layer, token) holds the top guess read from the residual stream after that layer through the
final norm and the unembedding; its colour is that guess's probability. Text in every cell is only
readable for a few dozen tokens, so by default the grid shows the last 64.
"""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import torch

from workbench.errors import ViewError
from workbench.views import _common as c
from workbench.views.labels import token_labels, visible

MAX_LENS_TOKENS = 64
READABLE = 12  # tokens whose cells are wide enough (~55 px) for 10-character text at a notebook's width


def logit_lens_grid(t, model=None, tokenizer=None, layers=None, k: int = 1, *, window=None) -> go.Figure:
    """Layers x tokens grid of the top logit-lens guess (text) coloured by its probability; hover shows the
    top k and the token that really came next.

    layers: model layers (default: every layer with residuals). window: None (up to 64 tokens, else the
    last 64), an int n (the last n) or (start, stop).
    """
    if "residuals" not in t.what:
        raise ViewError("this trace has no residuals, which the logit lens reads: trace with "
                           "what=['residuals'] (plus anything else).")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ViewError(f"k={k!r}: give how many guesses to list per cell (1 or more).")
    captured = t.layers
    layers = captured if layers is None else [c.pick(layer, captured, "layer", "this trace's residuals", count=t.num_layers)
                                              for layer in ([layers] if isinstance(layers, int) else layers)]
    start, stop, note = c.window(len(t.tokens), window, default=MAX_LENS_TOKENS)
    positions = range(start, stop)
    x = token_labels(t, positions)
    z, text, hover = [], [], []
    for layer in layers:
        got = t.logit_lens(layer, k, model, tokenizer, positions=positions)
        z.append(got.probs[:, 0].numpy())
        text.append([visible(s[0], 10) for s in got.strings])
        hover.append([_hover(t, p, got.strings[i], got.probs[i]) for i, p in enumerate(positions)])
    # no textfont size: plotly sizes the cell text to fit the cells
    fig = go.Figure(go.Heatmap(
        z=np.stack(z), x=x, y=[f"after layer {layer}" for layer in layers], text=text, texttemplate="%{text}",
        customdata=hover, **c.PROBABILITY, colorbar=dict(title="top-1 probability"),
        hovertemplate="%{y} · at %{x}<br>%{customdata}<extra></extra>"))
    fig.update_xaxes(title="token (the guess is for the token after it)", type="category", tickangle=-60)
    fig.update_yaxes(title="residual stream read", type="category", autorange="reversed")
    # No fixed width: the figure takes the notebook's (a wider one hides its right part). Past READABLE tokens
    # the cells get too narrow for their text at that width, so the subtitle says how to show fewer.
    small = (f"cell text shrinks to fit {len(x)} columns: window={READABLE} shows fewer, larger"
             if len(x) > READABLE else "")
    c.title(fig, t, f"Logit lens · top guess after each layer · {len(t.tokens)} tokens", note,
            "cell text: the most likely next token from that layer's residual; colour: its probability", small)
    # the plot keeps its height however many lines the title took
    fig.update_layout(height=c.axis_height(len(layers), per_row=26, lo=360) + fig.layout.margin.t - 60)
    return fig


def _hover(t, position: int, strings: list[str], probs: torch.Tensor) -> str:
    guesses = "<br>".join(f"{html.escape(visible(s))}  {float(p):.3f}" for s, p in zip(strings, probs))
    after = position + 1
    actual = html.escape(visible(t.tokens.strings[after])) if after < len(t.tokens) else "(end of trace)"
    return f"{guesses}<br>next token really: {actual}"
