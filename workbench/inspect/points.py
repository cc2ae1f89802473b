"""Hook points: one vocabulary that names every place a tool can read or change, the same for every family.

    blocks.3.resid_post               the output of decoder layer 3 (negative layers count from the end)
    blocks.*.attn.z                   a pattern: every layer's per-head attention output
    blocks.1.mlp.experts.2.act        expert 2's gated activation in layer 1, for the tokens routed to it
    logits                            the model's output logits

`s.trace(x, what=[...])`, `s.hook(name, fn)`, `s.set(name, value)`, `s.ablate(name, ...)`, `s.patch(..., at=...)`
and SAEs take these names; `KINDS` below is the table (with shapes) that the README reproduces. A name is resolved
against one model (`PointSpace`): layers, experts and family-only points (sinks, routing) are checked there, and an
unknown name is answered with the near matches.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from typing import Any, Iterable

from workbench.errors import HookPointError
from workbench.indices import format_indices
from workbench.model.adapters import ADAPTERS, Adapter, text_config


@dataclasses.dataclass(frozen=True)
class PointKind:
    """One kind of hook point (`blocks.{L}.attn.z`), as the README's table lists it."""

    key: str                 # "attn.z": the name without "blocks.{L}." (and the expert number)
    shape: str               # in a trace, per sequence (live hooks see a batch dimension first, see taps.py)
    doc: str
    needs: str | None = None  # "moe" (routed layers only), "sinks" (gpt-oss), or None
    settable: bool = True    # whether s.set / s.hook may replace it (else: read in traces only, with the reason)
    why_not: str = ""        # for a read-only point: what to use instead

    @property
    def template(self) -> str:
        if self.key == "logits":
            return "logits"
        if self.key.startswith("mlp.experts."):
            return "blocks.{L}.mlp.experts.{E}." + self.key.rsplit(".", 1)[1]
        return "blocks.{L}." + self.key


KINDS: dict[str, PointKind] = {k.key: k for k in (
    PointKind("resid_pre", "[T, d_model]", "the residual stream entering decoder layer L"),
    PointKind("resid_mid", "[T, d_model]", "the residual stream after attention's residual add, entering the MLP's norm"),
    PointKind("resid_post", "[T, d_model]", "the output of decoder layer L (= resid_pre of layer L+1)"),
    PointKind("attn.q", "[heads, T, head_dim]", "queries after RoPE, as the attention kernel receives them"),
    PointKind("attn.k", "[kv_heads, T, head_dim]", "keys after RoPE"),
    PointKind("attn.v", "[kv_heads, T, head_dim]", "values"),
    PointKind("attn.pattern", "[heads, T, T]", "attention probabilities (softmax with the sinks and the mask), computed "
              "from the recorded q and k", settable=False,
              why_not="no kernel but eager materialises the pattern: set attn.q or attn.k, or use s.ablate_heads / "
                      "s.scale_sinks"),
    PointKind("attn.z", "[T, heads, head_dim]", "each head's output: the input of o_proj, split by head"),
    PointKind("attn.out", "[T, d_model]", "the attention block's output (after o_proj), before the residual add"),
    PointKind("attn.sink", "[heads]", "the learned attention-sink logit of each head (gpt-oss)", needs="sinks",
              settable=False, why_not="a parameter, not an activation: use s.scale_sinks({L: factor})"),
    PointKind("mlp.out", "[T, d_model]", "the MLP block's output (the weighted sum of the chosen experts on MoE "
              "models), before the residual add"),
    PointKind("mlp.router.logits", "[T, experts]", "the router's logits, as the model applied them", needs="moe"),
    PointKind("mlp.router.indices", "[T, top_k]", "the chosen experts", needs="moe", settable=False,
              why_not="choose experts with s.force_experts, s.ablate_experts or s.replay_routing"),
    PointKind("mlp.router.weights", "[T, top_k]", "the chosen experts' weights, as applied", needs="moe",
              settable=False, why_not="s.replay_routing(trace) applies recorded weights"),
    PointKind("mlp.experts.in", "[rows, d_model]", "expert E's input rows: the tokens routed to it (their positions "
              "in t.positions(name))", needs="moe"),
    PointKind("mlp.experts.act", "[rows, d_ff]", "expert E's gated activation (the input of its down projection)",
              needs="moe"),
    PointKind("mlp.experts.out", "[rows, d_model]", "expert E's output before its routing weight is applied",
              needs="moe"),
    PointKind("logits", "[T, vocab]", "the model's output logits (float32 in traces)"),
)}

# Capture groups of earlier versions, kept because notebooks and the widget use them: each is a set of points.
GROUPS = {
    "routing": ("mlp.router.logits", "mlp.router.indices", "mlp.router.weights"),
    "attention": ("attn.q", "attn.k", "attn.pattern", "attn.sink"),
    "residuals": ("resid_post",),
}

_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(-?\d+)\.(in|act|out)")


@dataclasses.dataclass(frozen=True, order=True)
class HookPoint:
    """One resolved point of one model: `name` with a non-negative layer (and expert)."""

    name: str
    key: str
    layer: int | None = None
    expert: int | None = None

    @property
    def kind(self) -> PointKind:
        return KINDS[self.key]

    @property
    def stage(self) -> str | None:
        """"in", "act" or "out" for an expert point."""
        return self.key.rsplit(".", 1)[1] if self.expert is not None else None


def point_name(key: str, layer: int | None = None, expert: int | None = None) -> str:
    if key == "logits":
        return "logits"
    if expert is not None:
        return f"blocks.{layer}.mlp.experts.{expert}.{key.rsplit('.', 1)[1]}"
    return f"blocks.{layer}.{key}"


@dataclasses.dataclass(frozen=True)
class PointSpace:
    """The hook points of one model: its layers, routed layers and experts, and what its family has."""

    family: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    has_sinks: bool

    @classmethod
    def of(cls, model_or_config: Any, adapter: Adapter, moe_layers: Iterable[int] | None = None) -> "PointSpace":
        config = text_config(getattr(model_or_config, "config", model_or_config))
        n = int(config.num_hidden_layers)
        if moe_layers is None:
            moe_layers = adapter.moe_layers(model_or_config) if hasattr(model_or_config, "config") else (
                range(n) if adapter.is_moe else ())
        return cls(adapter.family, n, tuple(moe_layers), adapter.num_experts(config), adapter.has_sinks)

    def available(self, kind: PointKind, layer: int | None) -> bool:
        if kind.needs == "moe":
            return layer in self.moe_layers
        if kind.needs == "sinks":
            return self.has_sinks
        return True

    def names(self) -> list[str]:
        """Every point of this model, in layer order."""
        out = []
        for layer in range(self.num_layers):
            for key, kind in KINDS.items():
                if key == "logits" or not self.available(kind, layer):
                    continue
                if key.startswith("mlp.experts."):
                    out += [point_name(key, layer, e) for e in range(self.num_experts)]
                else:
                    out.append(point_name(key, layer))
        return out + ["logits"]

    # ---- resolving ---------------------------------------------------------------------------------
    def resolve(self, requested, layers: Iterable[int] | None = None) -> list[HookPoint]:
        """Points for a name, a pattern ("blocks.*.resid_post", "blocks.3.mlp.experts.*.out") or a list of them;
        `layers` limits what patterns match. HookPointError, with near matches, for anything that matches nothing."""
        items = [requested] if isinstance(requested, str) else list(requested)
        out: dict[str, HookPoint] = {}
        for item in items:
            if not isinstance(item, str):
                raise HookPointError(f"a hook point is a name such as 'blocks.0.resid_post', not {item!r}.")
            for p in self._resolve_one(item.strip(), None if layers is None else set(layers)):
                out.setdefault(p.name, p)
        return list(out.values())

    def _resolve_one(self, text: str, layers: set[int] | None) -> list[HookPoint]:
        if any(c in text for c in "*?["):
            # negative layers and experts count from the end in patterns too
            text = re.sub(r"^blocks\.(-\d+)\.", lambda m: f"blocks.{int(m.group(1)) % self.num_layers}.", text)
            if self.num_experts:
                text = re.sub(r"\.experts\.(-\d+)\.", lambda m: f".experts.{int(m.group(1)) % self.num_experts}.",
                              text)
            names = self.names()
            hits = [n for n in names if fnmatch.fnmatchcase(n, text)]
            points = [self.parse(n) for n in hits]
            if layers is not None:
                points = [p for p in points if p.layer is None or p.layer in layers]
            if not points:
                raise HookPointError(f"the pattern {text!r} matches no hook point of this {self.family} model"
                                     + (f" in layers {format_indices(sorted(layers))}" if layers is not None else "")
                                     + f". {self._hint(text)}")
            return points
        return [self.parse(text)]

    def parse(self, name: str) -> HookPoint:
        """One exact name (negative layers and experts allowed) as a HookPoint of this model."""
        if name == "logits":
            return HookPoint("logits", "logits")
        m = _NAME.fullmatch(name)
        if not m:
            raise HookPointError(f"unknown hook point {name!r}. {self._hint(name)}")
        layer, rest = int(m.group(1)), m.group(2)
        expert = None
        e = _EXPERT.fullmatch(rest)
        if e:
            expert, key = int(e.group(1)), "mlp.experts." + e.group(2)
        else:
            key = rest
        if key not in KINDS or key == "logits":
            raise HookPointError(f"unknown hook point {name!r}: no point {rest!r} in a block. {self._hint(name)}")
        kind = KINDS[key]
        if not -self.num_layers <= layer < self.num_layers:
            raise HookPointError(f"{name!r}: layer {layer} is out of range, this model has layers "
                                 f"0..{self.num_layers - 1} (negative ones count from the end).")
        layer %= self.num_layers
        if kind.needs == "sinks" and not self.has_sinks:
            raise HookPointError(f"{name!r}: attention sinks exist on gpt-oss only; this is a {self.family} model.")
        if kind.needs == "moe":
            if not self.moe_layers:
                families = ", ".join(a.family for a in ADAPTERS if a.is_moe)
                raise HookPointError(f"{name!r}: routers and experts exist on Mixture-of-Experts families only "
                                     f"({families}); this is a dense model (family {self.family!r}, no router). Its MLP is "
                                     f"'blocks.{layer}.mlp.out'.")
            if layer not in self.moe_layers:
                raise HookPointError(f"{name!r}: layer {layer} has a dense MLP (routed layers: "
                                     f"{format_indices(self.moe_layers)}).")
        if expert is not None:
            if not -self.num_experts <= expert < self.num_experts:
                raise HookPointError(f"{name!r}: expert {expert} is out of range, layer {layer} has experts "
                                     f"0..{self.num_experts - 1}.")
            expert %= self.num_experts
        return HookPoint(point_name(key, layer, expert), key, layer, expert)

    def _hint(self, text: str) -> str:
        names = self.names()
        generic = sorted({re.sub(r"^blocks\.\d+\.", "blocks.{L}.", re.sub(r"experts\.\d+\.", "experts.{E}.", n))
                          for n in names})
        near = difflib.get_close_matches(text, names, n=4, cutoff=0.6)
        near += [g for g in difflib.get_close_matches(re.sub(r"\d+", "{L}", text, count=1), generic, n=3, cutoff=0.6)
                 if g not in near]
        return (f"Near matches: {', '.join(near)}. " if near else "") + \
            "Points: " + ", ".join(sorted({KINDS[k].template for k in KINDS})) + \
            " (README, 'Hook points', lists them with shapes; s.points() lists this model's)."


def expand(space: PointSpace, what: Iterable[str] | str | None, layers=None) -> tuple[tuple[str, ...], list[HookPoint]]:
    """Split a capture request into the legacy groups ("routing", "attention", "residuals") and explicit points."""
    items = [what] if isinstance(what, str) else list(what or ())
    groups = tuple(w for w in items if isinstance(w, str) and w in GROUPS)
    names = [w for w in items if not (isinstance(w, str) and w in GROUPS)]
    return groups, (space.resolve(names, layers) if names else [])
