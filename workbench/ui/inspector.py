"""Token inspector: a finished Generation's tokens as chips coloured by probability; pick one to see
its top-k alternatives, and (from one cached trace of the whole conversation) the experts it was routed
through and its attention over earlier tokens.

Everything shown for token i describes the same forward step: the one that *chose* token i, i.e. the
query at the position just before it (the last prompt token for i = 0). Its alternatives are that
step's top-k, its experts and attention that position's routing and attention row.

Standard ipywidgets 8 only: one Button per token chip, from a fixed pool of PAGE_SIZE buttons reused
page by page (so a 4,000-token answer costs 64 widgets, not 4,000), plus a slider to move fast.
Figures are plain plotly `go.Figure`s shown in Output widgets through plotly's JupyterLab mime renderer.
"""
from __future__ import annotations

import html
import math
import sys

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio
import torch

from workbench.errors import BusyError
from workbench.ui.closing import close_tree
from workbench.views.labels import visible

PAGE_SIZE = 64
MEAN = "mean"  # the head dropdown's "average over heads" choice


def chip_color(logprob: float) -> str:
    """Red (unlikely) → yellow → green (likely), by the probability the model gave the chosen token."""
    p = math.exp(logprob) if logprob is not None and math.isfinite(logprob) else 0.0
    return f"hsl({round(120 * p)}, 75%, 82%)"


def show_figure(output: widgets.Output, fig: go.Figure | None) -> None:
    """Put `fig` in `output` as plotly's own mime bundle (rendered by the jupyterlab-plotly extension that
    ships with plotly: no CDN, no require.js). Setting `outputs` directly also works from any thread."""
    if fig is None:
        output.outputs = ()
        return
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    if "google.colab" in sys.modules:  # Colab has no plotly mime renderer: add the HTML it can show
        bundle["text/html"] = pio.to_html(fig, include_plotlyjs="cdn", full_html=False)
    bundle["text/plain"] = f"<plotly figure: {fig.layout.title.text or ''}>"
    output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


def attention_figure(trace, query: int, layer: int, head) -> go.Figure:
    """Bar chart of the attention of position `query` over positions 0..query (one head, or the mean)."""
    if head == MEAN:  # one head at a time: all heads' full patterns at once can be gigabytes
        row = sum(trace.attention(layer, h)[query, :query + 1] for h in trace.heads) / len(trace.heads)
        sink = trace.sink_mass_at(layer)[:, query].mean().item()
    else:
        row = trace.attention(layer, head)[query, :query + 1]
        sink = trace.sink_mass_at(layer, head)[query].item()
    labels = [f"{j}: {visible(s, 16)}" for j, s in enumerate(trace.tokens.strings[:query + 1])]
    fig = go.Figure(go.Bar(x=list(range(query + 1)), y=row.tolist(), customdata=labels,
                           hovertemplate="%{customdata}<br>%{y:.4f}<extra></extra>", marker_color="#4a7fb5"))
    title = f"attention of position {query} ({visible(trace.tokens.strings[query], 16)}), layer {layer}, " \
            f"head {head}" + (f" · sink {sink:.3f}" if sink else "")
    fig.update_layout(title=title, height=260, margin=dict(l=40, r=10, t=40, b=30),
                      xaxis_title="earlier position", yaxis_title="probability", template="plotly_white")
    return fig


def experts_figure(trace, position: int) -> go.Figure | None:
    """Heatmap layers × experts: the routing weight position `position` gave each chosen expert (0 elsewhere)."""
    routing = trace.routing
    if routing is None:
        return None
    n_experts = routing.logits.shape[-1]
    z = [[0.0] * n_experts for _ in routing.layers]
    for row in range(len(routing.layers)):
        for e, w in zip(routing.indices[row, position].tolist(), routing.weights[row, position].float().tolist()):
            z[row][e] = w
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_experts)), y=[str(layer) for layer in routing.layers],
                               colorscale="Blues", zmin=0, hovertemplate="layer %{y}, expert %{x}: %{z:.3f}"
                                                                        "<extra></extra>"))
    fig.update_layout(title=f"experts of position {position} ({visible(trace.tokens.strings[position], 16)})",
                      height=max(200, 40 + 18 * len(routing.layers)), margin=dict(l=40, r=10, t=40, b=30),
                      xaxis_title="expert", yaxis_title="layer", template="plotly_white")
    return fig


class TokenInspector(widgets.VBox):
    """Chips for a Generation's tokens; `select_token(i)` shows alternatives, experts and attention."""

    def __init__(self, session=None, trace_budget="2GB"):
        self.session, self.trace_budget = session, trace_budget
        self.generation = None
        self.selected: int | None = None
        self.page = 0
        self.trace = None                 # one trace per generation, made on the first selection
        self._traced = None               # the generation `trace` belongs to
        self.trace_error: str | None = None
        self.alternatives: list = []      # the selected token's Generation.alternatives entry
        self.attention_fig: go.Figure | None = None
        self.experts_fig: go.Figure | None = None

        self.title = widgets.HTML("<b>Token inspector</b> <span style='color:#888'>(generate first)</span>")
        self.chips = [widgets.Button(layout=widgets.Layout(width="auto", height="26px", padding="0 4px",
                                                           margin="1px", display="none"))
                      for _ in range(PAGE_SIZE)]
        for k, chip in enumerate(self.chips):
            chip.on_click(lambda _, k=k: self.select_token(self.page * PAGE_SIZE + k))
        self.chip_box = widgets.HBox(self.chips, layout=widgets.Layout(flex_flow="row wrap"))
        self.prev = widgets.Button(description="◀", layout=widgets.Layout(width="36px"))
        self.next = widgets.Button(description="▶", layout=widgets.Layout(width="36px"))
        self.page_label = widgets.Label()
        self.prev.on_click(lambda _: self.show_page(self.page - 1))
        self.next.on_click(lambda _: self.show_page(self.page + 1))
        self.slider = widgets.IntSlider(description="token", min=0, max=0, continuous_update=False,
                                        layout=widgets.Layout(width="420px"))
        self.slider.observe(lambda ch: self.select_token(ch["new"]), "value")
        self.pager = widgets.HBox([self.prev, self.page_label, self.next, self.slider])
        self.details = widgets.HTML()
        self.layer = widgets.Dropdown(description="layer", layout=widgets.Layout(width="160px"))
        self.head = widgets.Dropdown(description="head", layout=widgets.Layout(width="160px"))
        self._quiet = False  # set while the dropdowns are filled, so they do not redraw on each change
        for control in (self.layer, self.head):
            control.observe(lambda _: self._quiet or self._draw_attention(), "value")
        self.trace_note = widgets.HTML()
        self.experts_out, self.attention_out = widgets.Output(), widgets.Output()
        self.figures = widgets.VBox([self.trace_note, self.experts_out, widgets.HBox([self.layer, self.head]),
                                     self.attention_out])
        super().__init__([self.title, self.chip_box, self.pager, self.details, self.figures])
        self.reset()
        # SAE features of the selected token: set `inspector.sae = wb.load_sae(...)` to show them
        self.sae = None
        self.features = None               # Features of the whole conversation, for (generation, sae)
        self._features_for = None
        self.features_html = widgets.HTML()
        self.figures.children += (self.features_html,)

    def close(self) -> None:
        """Close the inspector and every widget in it (chips, figures), and let go of its trace."""
        self.generation = self.trace = self._traced = self.attention_fig = self.experts_fig = None
        self.features = self._features_for = None
        close_tree(self)

    # ---- state --------------------------------------------------------------------------------------
    def reset(self, note: str = "(generate first)") -> None:
        self.generation, self.selected, self.trace, self._traced = None, None, None, None
        self.alternatives, self.attention_fig, self.experts_fig, self.trace_error = [], None, None, None
        self.title.value = f"<b>Token inspector</b> <span style='color:#888'>{html.escape(note)}</span>"
        for chip in self.chips:
            chip.layout.display = "none"
        self.pager.layout.display = self.figures.layout.display = "none"
        self.details.value = self.trace_note.value = ""
        show_figure(self.experts_out, None)
        show_figure(self.attention_out, None)

    def show(self, generation) -> None:
        """Show the chips of a finished generation (nothing selected yet)."""
        self.reset()
        n = len(generation.token_ids)
        if not n:
            return
        self.generation = generation
        self.title.value = (f"<b>Token inspector</b> <span style='color:#888'>{n} tokens · click one (or use "
                            f"the slider) to see its alternatives, experts and attention</span>")
        with self.slider.hold_trait_notifications():
            self.slider.value, self.slider.max = 0, n - 1
        self.pager.layout.display = ""
        self.show_page(0)

    def show_page(self, page: int) -> None:
        g = self.generation
        if g is None:
            return
        pages = max(1, math.ceil(len(g.token_ids) / PAGE_SIZE))
        self.page = min(max(page, 0), pages - 1)
        self.page_label.value = f"page {self.page + 1}/{pages}"
        self.prev.disabled, self.next.disabled = self.page == 0, self.page == pages - 1
        for k, chip in enumerate(self.chips):
            i = self.page * PAGE_SIZE + k
            if i >= len(g.token_ids):
                chip.layout.display = "none"
                continue
            channel = g.token_channels[i] if i < len(g.token_channels) else "final"
            chip.description = visible(g.tokens[i], 14)
            chip.tooltip = f"#{i} p={math.exp(g.logprobs[i]):.3f} ({channel})"
            chip.style.button_color = chip_color(g.logprobs[i])
            chip.style.font_weight = "bold" if i == self.selected else ""
            chip.layout.border = "2px solid #333" if i == self.selected else \
                ("1px dashed #999" if channel == "header" else "")
            chip.layout.display = ""

    # ---- selection -------------------------------------------------------------------------------------
    def select_token(self, i: int) -> None:
        """Select completion token i: alternatives at once; experts and attention from the (cached) trace."""
        g = self.generation
        if g is None:
            return
        if not 0 <= i < len(g.token_ids):
            raise IndexError(f"token {i} is out of range: this generation has {len(g.token_ids)} tokens")
        self.selected = i
        self.slider.value = i  # no-op when the slider is what called us
        self.show_page(i // PAGE_SIZE)
        self.alternatives = list(g.alternatives[i]) if i < len(g.alternatives) else []
        self.details.value = self._details_html(g, i)
        self.figures.layout.display = ""
        self._ensure_trace()
        self._draw_experts()
        self._draw_attention()
        self._draw_features()

    def _details_html(self, g, i: int) -> str:
        p = math.exp(g.logprobs[i])
        channel = g.token_channels[i] if i < len(g.token_channels) else "final"
        rows = "".join(
            f"<tr style='{'font-weight:bold' if tid == g.token_ids[i] else ''}'><td>{r + 1}</td>"
            f"<td><code>{html.escape(visible(text, None))}</code></td><td>{tid}</td>"
            f"<td style='text-align:right'>{math.exp(lp):.4f}</td><td style='text-align:right'>{lp:.3f}</td></tr>"
            for r, (tid, text, lp) in enumerate(self.alternatives))
        table = (f"<table class='wb-alternatives' style='border-collapse:collapse'><tr><th>#</th><th>token</th>"
                 f"<th>id</th><th>probability</th><th>logprob</th></tr>{rows}</table>") if rows else \
            "<i>no alternatives recorded (top_alternatives=0)</i>"
        return (f"<div>token <b>#{i}</b> <code>{html.escape(visible(g.tokens[i], None))}</code> (id {g.token_ids[i]}, "
                f"{html.escape(channel)}) · p = {p:.4f} · logprob {g.logprobs[i]:.3f}</div>"
                f"<div style='color:#666;font-size:90%'>top alternatives at the step that chose it "
                f"(the model's raw distribution):</div>{table}")

    # ---- trace ---------------------------------------------------------------------------------------------
    def _ensure_trace(self) -> None:
        g = self.generation
        if self._traced is g or self.session is None:
            return
        self._traced, self.trace, self.trace_error = g, None, None
        try:
            self.trace_note.value = "<i style='color:#888'>tracing the conversation…</i>"
            # Session.trace refuses (BusyError) while a generation runs: capture and generation never overlap
            self.trace = self.session.trace(g, budget=self.trace_budget)
        except Exception as e:  # busy, budget, capture, unsupported model: say it, keep the alternatives
            self._traced = None if isinstance(e, BusyError) else g  # busy: try again on the next click
            self.trace_error = f"{type(e).__name__}: {e}"
        t = self.trace
        if t is not None and t.attention_layers:
            self._quiet = True
            try:
                self.layer.options, self.layer.value = t.attention_layers, t.attention_layers[-1]
                # the mean costs one full pattern per head: default to it only while that stays cheap
                cheap = len(t.heads) * len(t.tokens) ** 2 <= 2**26
                self.head.options, self.head.value = [MEAN, *t.heads], MEAN if cheap else t.heads[0]
            finally:
                self._quiet = False
        if self.trace_error is not None:
            self.trace_note.value = f"<div style='color:#b00'>no trace: {html.escape(self.trace_error)}</div>"
        elif t is not None and t.provenance:  # say what the numbers below were computed under
            self.trace_note.value = ("<div style='color:#a60'>traced with " + html.escape(
                "; ".join(f"{p['name']} {p.get('spec', p.get('path', ''))}" for p in t.provenance)) + "</div>")
        else:
            self.trace_note.value = ""

    def _query(self) -> int:
        """Trace position of the step that chose the selected token."""
        return len(self.generation.prompt_ids) + self.selected - 1

    def _draw_experts(self) -> None:
        t = self.trace
        self.experts_fig = experts_figure(t, self._query()) if t is not None else None
        show_figure(self.experts_out, self.experts_fig)

    def _draw_attention(self) -> None:
        t = self.trace
        if t is None or self.selected is None or not t.attention_layers or self.layer.value is None:
            self.attention_fig = None
        else:
            self.attention_fig = attention_figure(t, self._query(), self.layer.value, self.head.value)
        self.layer.layout.display = self.head.layout.display = "" if self.attention_fig is not None else "none"
        show_figure(self.attention_out, self.attention_fig)

    # ---- SAE features ----------------------------------------------------------------------------------------
    def _draw_features(self, k: int = 8) -> None:
        """The selected token's top `k` features of `self.sae`, read at the token's own position (the residual
        after it was read, where an SAE feature "fires on" it) from one residual trace per generation and SAE."""
        if self.sae is None or self.session is None or self.generation is None:
            self.features, self.features_html.value = None, ""
            return
        cached = self._features_for
        if cached is None or cached[0] is not self.generation or cached[1] is not self.sae:
            try:
                t = self.session.trace(self.generation, what=["residuals"], layers=[self.sae.layer],
                                       dtype=torch.float32, budget=self.trace_budget)
                self.features, self._features_for = self.sae.features(t, k), (self.generation, self.sae)
            except Exception as e:  # busy (try again next click), a mismatched SAE: say it
                self.features = None
                self.features_html.value = f"<div style='color:#b00'>no SAE features: " \
                                           f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</div>"
                return
        position = len(self.generation.prompt_ids) + self.selected
        rows = "".join(f"<tr><td>{f}</td><td style='text-align:right'>{v:.3f}</td></tr>"
                       for f, v in self.features.at(position))
        self.features_html.value = (
            f"<div style='color:#666;font-size:90%'>SAE features at this token (position {position}, residual after "
            f"layer {self.sae.layer}):</div><table class='wb-features'><tr><th>feature</th><th>activation</th></tr>"
            f"{rows or '<tr><td colspan=2><i>none active</i></td></tr>'}</table>")
