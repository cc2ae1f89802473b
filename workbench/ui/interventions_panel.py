"""The generation widget's "interventions" panel: rows the user adds, each one intervention on one layer.

    w.interventions.add("ablate experts", 1, "7, 12")      # kind, layer, values; on=True
    w.interventions.add("steer_experts", 2, "7:+2.0, 3:-1")
    w.interventions.add("scale sinks", 0, "0.5", on=False)
    w.interventions.active()   # [("ablate_experts", {1: [7, 12]}), ("steer_experts", {2: {7: 2.0, 3: -1.0}})]
    w.interventions.set_steering(vector, layer=3)          # a residual steering vector; its scale is a slider

`build()` parses and validates the rows that are on and returns fresh Intervention objects (not entered):
a bad row raises InterventionError naming the row and, from workbench.interventions, the valid range.
Only the kinds that fit the model are offered: routing kinds for MoE models, sinks for models with sinks.
"""
from __future__ import annotations

import contextlib
import html
import re

import ipywidgets as widgets

from workbench.errors import InterventionError
from workbench.intervene.interventions import INTERVENTIONS
from workbench.intervene.steering import steer
from workbench.ui.closing import close_tree
from workbench.ui.inspector import TokenInspector

# label shown in the dropdown -> workbench.interventions name, and what its values field takes
KINDS = {"ablate experts": "ablate_experts", "force experts": "force_experts", "steer experts": "steer_experts",
         "ablate heads": "ablate_heads", "scale sinks": "scale_sinks"}
PLACEHOLDERS = {"ablate_experts": "experts, e.g. 7, 12", "force_experts": "k experts, e.g. 0, 1, 2, 3",
                "steer_experts": "expert:amount, e.g. 7:+2.0, 3:-1", "ablate_heads": "heads, e.g. 0, 3",
                "scale_sinks": "factor, e.g. 0.5"}
_LABELS = {name: label for label, name in KINDS.items()}


def kinds_for(session) -> list[str]:
    """The dropdown labels valid for this session's model."""
    adapter = session.adapter
    return [label for label, name in KINDS.items()
            if (adapter.is_moe or not name.endswith("_experts")) and (adapter.has_sinks or name != "scale_sinks")]


def parse_values(name: str, text: str):
    """The values field of a row as the intervention's per-layer value (InterventionError if malformed)."""
    items = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if not items:
        raise InterventionError(f"no values: {name} takes {PLACEHOLDERS[name]}")
    try:
        if name == "scale_sinks":
            if len(items) != 1:
                raise ValueError
            return float(items[0])
        if name == "steer_experts":
            pairs = [item.split(":") for item in items]
            if any(len(p) != 2 for p in pairs):
                raise ValueError
            return {int(e): float(a) for e, a in pairs}
        return [int(x) for x in items]
    except ValueError:
        raise InterventionError(f"cannot read {text!r}: {name} takes {PLACEHOLDERS[name]}") from None


def _name(kind: str) -> str:
    name = KINDS.get(kind, kind)
    if name not in INTERVENTIONS:
        raise InterventionError(f"unknown intervention kind {kind!r}; choose from {sorted(KINDS)}")
    return name


class InterventionRow(widgets.HBox):
    """kind · layer · values · on · remove."""

    def __init__(self, panel: "InterventionsPanel", kind: str, layer: int = 0, values: str = "", on: bool = True):
        self.kind = widgets.Dropdown(options=panel.kinds, value=kind, layout=widgets.Layout(width="150px"))
        self.layer = widgets.IntText(value=layer, description="layer", layout=widgets.Layout(width="130px"),
                                     style={"description_width": "40px"})
        self.values = widgets.Text(value=values, placeholder=PLACEHOLDERS[KINDS[kind]],
                                   layout=widgets.Layout(width="240px"))
        self.on = widgets.Checkbox(value=on, description="on", indent=False, layout=widgets.Layout(width="50px"))
        self.remove_button = widgets.Button(icon="times", tooltip="remove this row",
                                            layout=widgets.Layout(width="36px"))
        self.remove_button.on_click(lambda _: panel.remove(self))
        self.kind.observe(lambda ch: setattr(self.values, "placeholder", PLACEHOLDERS[KINDS[ch["new"]]]), "value")
        for control in (self.kind, self.layer, self.values, self.on):
            control.observe(lambda _: panel.refresh(), "value")
        super().__init__([self.kind, self.layer, self.values, self.on, self.remove_button])

    @property
    def name(self) -> str:
        return KINDS[self.kind.value]

    def spec(self) -> tuple[str, dict]:
        """(intervention name, {layer: values}), values parsed but not yet checked against the model."""
        return self.name, {int(self.layer.value): parse_values(self.name, self.values.value)}

    def describe(self) -> str:
        return f"{self.kind.value} L{self.layer.value}: {self.values.value.strip() or '∅'}"


class InterventionsPanel(widgets.Accordion):
    """A collapsible list of intervention rows, an "add" button and a summary of what is on."""

    def __init__(self, session):
        self.session = session
        self.kinds = kinds_for(session)
        self.rows: list[InterventionRow] = []
        self.rows_box = widgets.VBox()
        self.add_button = widgets.Button(description="add", icon="plus", layout=widgets.Layout(width="80px"))
        self.add_button.on_click(lambda _: self.add(self.kinds[0], 0, ""))
        self.summary = widgets.HTML()
        self.summary.add_class("wb-interventions-summary")
        # Residual steering: the vector comes from Python (set_steering); its scale is a slider, 0 = off.
        self.steering_vector, self.steering_layer = None, None
        self.steer_scale = widgets.FloatSlider(value=0.0, min=-10.0, max=10.0, step=0.25, description="steer",
                                               continuous_update=False, disabled=True,
                                               layout=widgets.Layout(width="340px"))
        harmony = getattr(session, "harmony", False)
        self.steer_channels = widgets.Dropdown(options=["all positions", "final", "analysis"] if harmony
                                               else ["all positions"], value="all positions", disabled=True,
                                               layout=widgets.Layout(width="140px"))
        self.steer_note = widgets.HTML("<span style='color:#888'>no steering vector: "
                                       "w.interventions.set_steering(vector, layer)</span>")
        for control in (self.steer_scale, self.steer_channels):
            control.observe(lambda _: self.refresh(), "value")
        steering = widgets.HBox([self.steer_scale, self.steer_channels, self.steer_note])
        super().__init__([widgets.VBox([self.rows_box, widgets.HBox([self.add_button, self.summary]), steering])],
                         titles=("interventions",), selected_index=None)
        self.add_class("wb-interventions")
        self.refresh()

    def add(self, kind: str, layer: int, values, on: bool = True) -> InterventionRow:
        """Add a row. `kind`: a label ("ablate experts") or a name ("ablate_experts"); `values` as typed
        ("7, 12", "7:+2.0, 3:-1", "0.5") or as Python (a list, a {expert: amount} dict, a number)."""
        label = _LABELS[_name(kind)]
        if label not in self.kinds:
            raise InterventionError(f"{label} does not apply to this model (family {self.session.adapter.family!r}); "
                                    f"it takes {self.kinds}")
        if isinstance(values, dict):
            values = ", ".join(f"{e}:{a:+g}" for e, a in values.items())
        elif isinstance(values, (list, tuple, set)):
            values = ", ".join(map(str, values))
        row = InterventionRow(self, label, layer, str(values), on)
        self.rows.append(row)
        self.rows_box.children = tuple(self.rows)
        self.refresh()
        return row

    def set_steering(self, vector, layer: int, scale: float | None = None) -> None:
        """Use `vector` (hidden-size tensor, e.g. s.steering_vector(...)) at `layer`; the slider sets its scale."""
        steer(self.session, vector, layer)  # checked now: wrong width or layer fails here, not at Generate
        self.steering_vector, self.steering_layer = vector, layer
        self.steer_scale.disabled = self.steer_channels.disabled = False
        if scale is not None:
            self.steer_scale.value = scale
        self.steer_note.value = (f"<span style='color:#555'>vector |v| = {float(vector.norm()):.3g} "
                                 f"at layer {layer}</span>")
        self.refresh()

    def steering(self):
        """A fresh steer intervention for the slider's scale, or None when off (no vector, or scale 0)."""
        if self.steering_vector is None or self.steer_scale.value == 0.0:
            return None
        channels = None if self.steer_channels.value == "all positions" else [self.steer_channels.value]
        return steer(self.session, self.steering_vector, self.steering_layer, scale=self.steer_scale.value,
                     channels=channels)

    def remove(self, row: InterventionRow) -> None:
        self.rows.remove(row)
        self.rows_box.children = tuple(self.rows)
        close_tree(row)  # its controls, layouts and styles too
        self.refresh()

    def clear(self) -> None:
        """Remove every row."""
        for row in list(self.rows):
            self.remove(row)

    def active(self) -> list[tuple[str, dict]]:
        """The rows that are on, as (intervention name, {layer: values}); InterventionError if one is malformed."""
        return [self._checked(i, row, row.spec) for i, row in enumerate(self.rows) if row.on.value]

    def build(self) -> list:
        """Fresh, validated (not entered) Intervention objects for the rows that are on, in row order."""
        built = []
        for i, row in enumerate(self.rows):
            if row.on.value:
                name, spec = self._checked(i, row, row.spec)
                built.append(self._checked(i, row, lambda: INTERVENTIONS[name](self.session, spec)))
        steering = self.steering()
        return built + ([steering] if steering is not None else [])

    def _checked(self, i: int, row: InterventionRow, make):
        try:
            return make()
        except InterventionError as e:
            raise InterventionError(f"interventions row {i + 1} ({row.describe()}): {e}") from None

    def refresh(self) -> None:
        on = [row.describe() for row in self.rows if row.on.value]
        if getattr(self, "steering_vector", None) is not None and self.steer_scale.value != 0.0:
            on.append(f"steer L{self.steering_layer} × {self.steer_scale.value:+g}"
                      + ("" if self.steer_channels.value == "all positions" else f" ({self.steer_channels.value})"))
        self.summary.value = ("<span style='color:#a50'>active: " + html.escape(" · ".join(on)) + "</span>") if on \
            else "<span style='color:#888'>none active</span>"
        self.set_title(0, f"interventions ({len(on)} on)" if on else "interventions")

    def close(self) -> None:
        """Close the panel and every widget in it."""
        close_tree(self)


class InterventionInspector(TokenInspector):
    """A TokenInspector whose on-demand trace re-enters the interventions that were active for its
    generation, so the experts and attention it shows are the ones the model used for those tokens."""

    interventions: tuple = ()  # (name, spec) pairs recorded with the shown generation

    def reset(self, note: str = "(generate first)") -> None:
        super().reset(note)
        self.interventions = ()

    def show(self, generation, interventions=()) -> None:
        super().show(generation)
        self.interventions = tuple(interventions)

    def _ensure_trace(self) -> None:
        if not self.interventions or self._traced is self.generation or self.session is None:
            return super()._ensure_trace()
        try:
            with contextlib.ExitStack() as stack:
                for name, spec in self.interventions:
                    stack.enter_context(steer(self.session, **spec) if name == "steer"
                                        else INTERVENTIONS[name](self.session, spec))
                super()._ensure_trace()
        except Exception as e:  # refused on entry (a generation running elsewhere): try again on the next click
            self._traced, self.trace = None, None
            self.trace_error = f"{type(e).__name__}: {e}"
            self.trace_note.value = f"<div style='color:#b00'>no trace: {html.escape(self.trace_error)}</div>"
            return
        if self.trace is not None:
            self.trace_note.value = ("<div style='color:#a50;font-size:90%'>traced with its interventions: "
                                     + html.escape(" · ".join(f"{n} {s}" for n, s in self.interventions)) + "</div>")
