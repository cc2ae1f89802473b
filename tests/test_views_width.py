"""Every plotly view at notebook width: it has a title, no fixed width wider than a notebook, and its title and
subtitle fit that width.

JupyterLab's output area is 800-1,000 px wide on a laptop: a figure drawn wider hides its right part (the
residual-patching heatmap was 1,600 px, so the one column that lit up was off-screen), and plotly never wraps
a title: what runs past the right edge is cut. So:

- layout.width, when set, is at most MAX_WIDTH (else the figure takes the notebook's width: autosize);
- each line of the title (and subtitle) fits the figure's width, or NOTEBOOK_WIDTH when it has none. Plotly's
  default title font is 1.4 x 12 ≈ 17 px and the subtitle's 0.7 x that ≈ 12 px; an average character of its
  font (Open Sans) is about half an em, so a line of n characters is estimated at n x size / 2 px;
- the top margin holds the title's and subtitle's lines.

The figures come from the offline nano gpt-oss (short, windowed and intervened traces; patching; attribution)
and, in the slow test, from SmolLM2 (a dense model).
"""
import html
import re

import pytest
import torch

import workbench as wb
from workbench import fixtures, views
from workbench.ui import inspector

MAX_WIDTH = 1000      # px: a fixed width above this runs off a notebook
NOTEBOOK_WIDTH = 800  # px: what an autosized figure gets in JupyterLab on a laptop, file browser open
EM = 0.5              # average character width of the title font, in ems
LINE = 1.3            # line height, in ems

PROMPT = "Please compute the following extraordinarily straightforward arithmetic: what is 2 plus 3?"


def lines(text) -> list[str]:
    """The lines a plotly title shows: split at <br>, tags dropped, entities read."""
    return [html.unescape(re.sub(r"<[^>]+>", "", line)) for line in re.split(r"<br\s*/?>", text or "")]


def check(fig, name):
    """The rules above, with a message naming the view and the offending text."""
    title = fig.layout.title
    assert title.text, f"{name}: no title"
    width = fig.layout.width
    assert width is None or width <= MAX_WIDTH, f"{name}: {width} px wide (at most {MAX_WIDTH}, or autosize)"
    room = (width or NOTEBOOK_WIDTH) - 10  # the title starts at the left edge (x=0) or near it
    size = title.font.size or 17
    sub = title.subtitle.text if title.subtitle else None
    sub_size = (title.subtitle.font.size if sub else None) or round(size * 0.7)
    for text, px in ((title.text, size), (sub, sub_size)):
        for line in lines(text) if text else []:
            need = len(line) * px * EM
            assert need <= room, f"{name}: {need:.0f} px of text in {room} px: {line!r}"
    if fig.layout.margin.t is not None:  # None: plotly's default 100 px, enough for the views that keep it
        height = LINE * (size * len(lines(title.text)) + (sub_size * len(lines(sub)) if sub else 0))
        height += 40 if fig.layout.xaxis.side == "top" else 0  # its tick labels and title are in the margin too
        assert fig.layout.margin.t >= height, f"{name}: top margin {fig.layout.margin.t} px < {height:.0f} px of title"


@pytest.fixture(scope="module")
def nano():
    return wb.load(str(fixtures.nano_path()))


@pytest.fixture(scope="module")
def figures(nano):
    """{view name: [figures]}: each view on a short trace, a windowed one (long notes) and one taken under an
    intervention (its provenance heads the subtitle)."""
    s = nano
    what = ["routing", "attention", "residuals"]
    short = s.trace(s.render(PROMPT), what=what)
    ids = torch.randint(3, 8000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    long = s.trace(ids, what=what)
    with s.ablate_experts({0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}), s.ablate_heads({1: [0, 1, 2]}):
        taken = s.trace(s.render(PROMPT), what=what)
    traces = [short, long, taken]
    # plain text, not the chat-rendered prompt: patching costs a forward per 8 sites (positions x layers)
    five, six = (s.tokenizer.encode(x, add_special_tokens=False)[-1] for x in ("5", "6"))
    patched = [s.patch("What is 2 plus 3?", "What is 2 plus 4?", at=at, answers=(five, six))
               for at in ("residual", "mlp", "attention_heads", "experts")]
    attributions = [s.attribute(short.tokens.ids), s.attribute(long.tokens.ids, position=150)]
    out = {
        "attention_heatmap": [views.attention_heatmap(t, layer, 1) for t in traces for layer in (0, 1)],
        "head_grid": [views.head_grid(t, metric) for t in traces for metric in ("sink_mass", "entropy")],
        "sink_mass": [views.sink_mass(t) for t in traces],
        "expert_heatmap": [views.expert_heatmap(t, 2) for t in traces],
        "expert_load": [views.expert_load(t) for t in traces],
        "expert_flow": [views.expert_flow(t) for t in traces] + [views.expert_flow(long, layers=(0, 1, 2, 3))],
        "coactivation": [views.coactivation(t, 1) for t in traces],
        "routing_entropy": [views.routing_entropy(t) for t in traces],
        "logit_lens_grid": [views.logit_lens_grid(t, s.model, s.tokenizer, k=3) for t in traces],
        "patching_heatmap": [views.patching_heatmap(r, value) for r in patched for value in ("normalized", "metric")],
        "attribution_bars": [views.attribution_bars(a) for a in attributions],
        "attribution_heatmap": [views.attribution_heatmap(a, of) for a in attributions for of in ("heads", "experts")],
        "attribution_figure": [views.attribution_figure(a, "bars", n=40) for a in attributions],
        # the token inspector's two figures (workbench/ui/inspector.py), at the last position
        "inspector.attention_figure": [inspector.attention_figure(t, len(t.tokens) - 1, 3, head)
                                       for t in traces for head in (inspector.MEAN, 2)],
        "inspector.experts_figure": [inspector.experts_figure(t, len(t.tokens) - 1) for t in traces],
    }
    return out


VIEWS = ["attention_heatmap", "head_grid", "sink_mass", "expert_heatmap", "expert_load", "expert_flow",
         "coactivation", "routing_entropy", "logit_lens_grid", "patching_heatmap", "attribution_bars",
         "attribution_heatmap", "attribution_figure", "inspector.attention_figure", "inspector.experts_figure"]


def test_every_public_view_is_checked():
    figure_functions = set(views.__all__) - {"token_labels", "visible"}  # label helpers, not figures
    assert figure_functions <= set(VIEWS), f"add {sorted(figure_functions - set(VIEWS))} to this test"


@pytest.mark.parametrize("name", VIEWS)
def test_view_fits_a_notebook(figures, name):
    assert figures[name]
    for k, fig in enumerate(figures[name]):
        check(fig, f"{name} #{k}")


@pytest.mark.slow
def test_views_of_a_dense_model_fit_a_notebook(smollm2_session):
    s = smollm2_session
    t = s.trace(s.render(PROMPT), what=["attention", "residuals"], layers=[0, 15, 29])
    figs = {"attention_heatmap": views.attention_heatmap(t, 29, 5),
            "head_grid": views.head_grid(t, metric="entropy"),
            "logit_lens_grid": views.logit_lens_grid(t, s.model, s.tokenizer, k=3),
            "patching_heatmap": s.patch("When John and Mary went to the store, John gave a drink to",
                                        "When John and Mary went to the store, Mary gave a drink to",
                                        at="residual", layers=[0, 29]).figure(),
            "attribution_bars": s.attribute(t.tokens.ids).figure("bars"),
            "inspector.attention_figure": inspector.attention_figure(t, len(t.tokens) - 1, 29, 5)}
    for name, fig in figs.items():
        check(fig, f"SmolLM2 {name}")
