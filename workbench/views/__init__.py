"""Views: plotly figures (and ipywidgets) on top of generations and traces.

Every figure function takes a Trace and returns a `plotly.graph_objects.Figure` (display it by leaving it
last in a cell; plotly's own bundled JavaScript renders it, nothing is fetched from a CDN).

    attention_heatmap(t, layer, head, window=None)   one head: queries x keys (+ "⟂ sink" column)
    head_grid(t, metric="sink_mass" | "entropy")     layers x heads
    sink_mass(t)                                     sink mass by layer/head and along the text
    expert_heatmap(t, layer, window=None)            token x expert routing weights
    expert_load(t)                                   tokens per expert per layer vs the uniform k/E
    expert_flow(t, layers=(a, b))                    Sankey of top-1 experts from layer to layer
    coactivation(t, layer)                           expert x expert: chosen for the same token
    routing_entropy(t)                               layers x tokens: router uncertainty in bits
    logit_lens_grid(t, model, tokenizer, layers=None, k=1, window=None)

Long traces are windowed (attention and expert heatmaps: the last 256 tokens; lens grid: the last 64) and
the subtitle says which tokens are shown; pass window=n or window=(start, stop) to choose.
"""
from workbench.views.attention import attention_heatmap
from workbench.views.attribution import attribution_bars, attribution_figure, attribution_heatmap
from workbench.views.flow import coactivation, expert_flow
from workbench.views.heads import head_grid, sink_mass
from workbench.views.labels import token_labels, visible
from workbench.views.lens import logit_lens_grid
from workbench.views.patching import patching_heatmap
from workbench.views.routing import expert_heatmap, expert_load, routing_entropy

__all__ = ["attention_heatmap", "head_grid", "sink_mass", "expert_heatmap", "expert_load", "expert_flow",
           "coactivation", "routing_entropy", "logit_lens_grid", "patching_heatmap", "token_labels", "visible"]
__all__ += ["attribution_bars", "attribution_figure", "attribution_heatmap"]
