"""Interventions: change what the model computes inside a `with` block, and nothing after it.

    with ablate_experts(s, {3: [7, 12]}):       # layer -> experts never chosen
        g = s.chat("...")
    with force_experts(s, {3: [0, 1, 2, 3]}):   # exactly top-k experts, chosen for every token
    with steer_experts(s, {3: {7: +2.0}}):      # added to those experts' router logits
    with ablate_heads(s, {5: [0, 3]}):          # those heads' outputs zeroed before o_proj
    with scale_sinks(s, {5: 0.0}):              # gpt-oss attention-sink logits multiplied by a factor

Each one is a context manager that can be nested with any other (and with `s.trace` / `s.capture`),
re-entered later, and always undoes itself on exit, also through an exception: afterwards the model
gives bit-identical logits to before.

Routing: every routing intervention is a transform of one layer's router logits, applied before the
model routes, so the model's own arithmetic turns the changed logits into experts and weights:

- ablate: the ablated experts' logits become -inf. Top-k then picks among the others; softmax-first
  routers (Mixtral, Qwen, OLMoE) spread the probability over the remaining experts only, and the
  top-k weights are renormalised exactly as the model renormalises (sum 1 for gpt-oss, Mixtral and
  norm_topk_prob models; without norm_topk_prob the model does not renormalise, and neither do we).
- force: every logit except the forced experts' becomes -inf, so exactly those k experts are chosen;
  their weights are the model's own weighting over their (unchanged) logits: gpt-oss, softmax over
  the k forced logits; softmax-first routers, the softmax over the forced logits (then the model's
  renormalisation, a no-op there).
- steer: the given amounts are added to those experts' logits (in the logits' dtype).

Where the logits are changed: the routed MLP's forward is wrapped, for the duration, in a
TorchFunctionMode that intercepts the one `F.linear` whose weight is the router's weight and applies
the transforms to its result. That is the router's computation on every path: inside the router
module (gpt-oss plain path, Mixtral, Qwen-MoE, OLMoE: `self.router(...)` / `self.gate(...)`) and
inside transformers' `Mxfp4GptOssMLP.forward`, which computes `F.linear(x, router.weight, router.bias)`
itself and never calls the router module (router hooks would never fire there). An MLP forward that
did not go through such an F.linear raises InterventionError instead of silently doing nothing.
The transforms live in the router-logits primitive (workbench/inspect/routing.py), which the capture
also reads when it recomputes routing from the MLP input, so a trace taken inside an intervention
records the logits, experts and weights the model really used.

Heads: a forward pre-hook on the attention's `o_proj` zeroes the input slices
[h*head_dim, (h+1)*head_dim) of the ablated heads (on a copy: the model's tensors are never written).

Sinks: the attention module's `sinks` Parameter is replaced by a new Parameter holding
`sinks * factor` and the original Parameter object itself is put back on exit (it is never written,
so restoring is exact). Offloaded (meta) sinks are refused: accelerate would reload the original.

Why one module of about 410 lines: the five interventions share one primitive (a transform of the router's logits
inside the routed MLP) and one undo rule; each is a short class beside the others.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from workbench.errors import BusyError, InterventionError
from workbench.indices import format_indices, resolve_index
from workbench.inspect.routing import (
    LogitTransform,
    add_router_transform,
    router_transforms,
)
from workbench.model import compat
from workbench.model.adapters import head_dim as adapter_head_dim
from workbench.model.adapters import text_config


# ---- the base class ------------------------------------------------------------------------------------
class Intervention:
    """A change to the model's computation, active only inside `with`. Nest freely; re-enter later.

    Entering while a generation runs on the session raises BusyError (it would change half-way). On exit,
    a generation started inside and still running is waited for, so all its tokens see the intervention.
    """

    name = "intervention"
    example = "{3: [0, 1]}"  # shown in error messages

    def __init__(self, session, spec):
        self.session, self.model, self.adapter = session, session.model, session.adapter
        model_config = self.model.config
        self.config = text_config(model_config)
        self.n_layers = len(self.adapter.layer_list(self.model))
        self.spec = self._check(spec)
        self._undo: list | None = None

    def _check(self, spec):  # validate and normalise the user's dict; raise InterventionError
        raise NotImplementedError

    def _install(self) -> None:  # change the model, appending an undo callable per change to self._undo
        raise NotImplementedError

    @property
    def active(self) -> bool:
        return self._undo is not None

    def __enter__(self) -> "Intervention":
        if self._undo is not None:
            raise InterventionError(f"{self!r} is already active: create a second one to apply it twice.")
        if getattr(self.session, "busy", False):
            raise BusyError("a generation is running on this session: stop it or wait before intervening")
        self._undo = _UndoStack()
        try:
            self._install()
            active = getattr(self.session, "active_interventions", None)
            if active is not None:  # provenance: traces taken inside record what was active
                active.append(self)
                self._undo.append(lambda: active.remove(self) if self in active else None)
        except BaseException:
            self._unwind()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        try:
            wait = getattr(self.session, "wait_idle", None)
            if wait is not None:
                wait()
        finally:
            self._unwind()
        return False

    def _unwind(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo.close()  # every undo runs, last installed first, also when one raises (raised afterwards)

    def __repr__(self) -> str:
        return f"{self.name}({getattr(self, 'spec', '...')!r})"

    def describe(self) -> dict:
        """What this intervention does, as JSON-ready data: recorded in traces taken while it is active."""
        return {"name": self.name, "spec": _jsonable(self.spec)}

    # ---- checks shared by the subclasses ----
    def _spec_dict(self, spec) -> dict:
        if not isinstance(spec, dict) or not spec:
            raise InterventionError(f"{self.name} takes a non-empty dict keyed by layer, e.g. {self.example}; "
                                    f"got {spec!r}.")
        return spec

    def _layer(self, layer) -> int:
        """A model layer; negative counts from the last layer, as everywhere in the workbench."""
        return resolve_index(layer, range(self.n_layers), "layer", "this model", InterventionError,
                             count=self.n_layers)


class _UndoStack(contextlib.ExitStack):
    """The changes an intervention made, undone in reverse order on exit: `append(fn)` registers one undo."""

    def append(self, fn) -> None:
        self.callback(fn)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- routing ---------------------------------------------------------------------------------------------
class _RoutingIntervention(Intervention):
    def __init__(self, session, spec):
        if not session.adapter.is_moe:
            raise InterventionError(f"this is a dense model (family {session.adapter.family!r}, no router): "
                                    "routing interventions need a Mixture-of-Experts model (gpt-oss, Mixtral, "
                                    "Qwen-MoE, OLMoE).")
        self.routed = session.adapter.moe_layers(session.model)
        super().__init__(session, spec)
        self.n_experts, self.k = self.adapter.num_experts(self.config), self.adapter.top_k(self.config)

    def _layer(self, layer) -> int:
        layer = resolve_index(layer, range(self.n_layers), "layer", "this model", InterventionError,
                              count=self.n_layers, hint=f" (MoE layers {format_indices(self.routed)})")
        if layer not in self.routed:
            raise InterventionError(f"layer {layer} has a dense MLP (no router): this model's routed (MoE) layers "
                                    f"are {format_indices(self.routed)}.")
        return layer

    def _expert(self, layer: int, expert) -> int:
        n = self.adapter.num_experts(self.config)
        return resolve_index(expert, range(n), "expert", "this model", InterventionError, count=n,
                             context=f" (layer {layer})")

    def _experts(self, layer: int, experts) -> list[int]:
        """One expert or several, checked, sorted and de-duplicated."""
        experts = [experts] if _is_int(experts) else list(experts)
        return sorted({self._expert(layer, e) for e in experts})

    def _transform(self, layer: int, value) -> LogitTransform:
        raise NotImplementedError

    def _install(self) -> None:
        for layer, value in self.spec.items():
            mlp = self.adapter.mlp_module(self.model, layer)
            transform = self._transform(layer, value)
            blocked = set(transform.blocked).union(*(t.blocked for t in router_transforms(mlp)))
            if self.n_experts - len(blocked) < self.k:
                raise InterventionError(
                    f"{self!r} leaves {self.n_experts - len(blocked)} expert(s) at layer {layer} (with the other "
                    f"active interventions), fewer than the {self.k} the model chooses per token.")
            self._undo.append(add_router_transform(mlp, getattr(mlp, self.adapter.router), transform))


def _blocking(experts: list[int], n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(logits: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=logits.device)
        mask[experts] = True
        return logits.masked_fill(mask, -math.inf)
    return fn


class ablate_experts(_RoutingIntervention):
    """`with ablate_experts(s, {layer: [experts]}, mode="reroute"):` those experts are never chosen at those layers.

    mode="reroute" (the default): their router logits become -inf, so top-k picks among the rest and the weights are
    the model's own over the rest (renormalised to sum 1 wherever the model renormalises its top-k).
    mode="zero": routing is left as it is, and the experts' outputs are zeroed wherever they were chosen, so their
    weight is given to nobody (through the per-expert hook point blocks.L.mlp.experts.E.out)."""

    name = "ablate_experts"
    example = "{3: [7, 12]}"

    def __init__(self, session, spec, mode: str = "reroute"):
        if mode not in ("reroute", "zero"):
            raise InterventionError(f"mode={mode!r}: choose 'reroute' (never chosen; top-k over the rest) or 'zero' "
                                    "(chosen as before, output zeroed: its weight goes to nobody).")
        self.mode = mode
        super().__init__(session, spec)

    def _check(self, spec):
        out = {}
        for layer, experts in self._spec_dict(spec).items():
            layer = self._layer(layer)
            out[layer] = self._experts(layer, experts)
        return out

    def _transform(self, layer, experts):
        return LogitTransform(_blocking(experts, self.n_experts), set(experts), f"ablate {experts}")

    def _install(self) -> None:
        if self.mode == "reroute":
            return super()._install()
        from workbench.errors import HookPointError
        from workbench.inspect.points import PointSpace
        from workbench.inspect.taps import Taps

        space = PointSpace.of(self.model, self.adapter)
        points = [space.parse(f"blocks.{layer}.mlp.experts.{e}.out") for layer, es in self.spec.items() for e in es]
        taps = Taps(self.model, self.adapter, [(p, lambda x, hook: torch.zeros_like(x)) for p in points],
                    preset=getattr(getattr(self.session, "report", None), "preset", None))
        try:
            taps.__enter__()
        except HookPointError as e:
            raise InterventionError(f"mode='zero' reaches inside the experts, and {e}") from e
        self._undo.append(lambda: taps.__exit__(None, None, None))

    def describe(self) -> dict:
        return {"name": self.name, "spec": _jsonable(self.spec), "mode": self.mode}

    def __repr__(self) -> str:
        return f"{self.name}({self.spec!r}" + (", mode='zero')" if self.mode == "zero" else ")")


class force_experts(_RoutingIntervention):
    """`with force_experts(s, {layer: [k experts]}):` exactly those experts, for every token, at those layers.

    Every other logit becomes -inf, so the router's own arithmetic picks the forced ones and weights them
    as it would: gpt-oss, softmax over their k logits; Mixtral/Qwen/OLMoE, the softmax restricted to them."""

    name = "force_experts"
    example = "{3: [0, 1, 2, 3]}"

    def _check(self, spec):
        out = {}
        k = self.adapter.top_k(self.config)
        for layer, experts in self._spec_dict(spec).items():
            layer = self._layer(layer)
            chosen = self._experts(layer, experts)
            experts = [experts] if _is_int(experts) else list(experts)
            if len(chosen) != k or len(experts) != k:
                raise InterventionError(f"force_experts needs exactly {k} distinct experts per layer (the model "
                                        f"chooses {k} per token); layer {layer} got {experts!r}.")
            out[layer] = chosen
        return out

    def _transform(self, layer, experts):
        others = [e for e in range(self.n_experts) if e not in experts]
        return LogitTransform(_blocking(others, self.n_experts), set(others), f"force {experts}")


class steer_experts(_RoutingIntervention):
    """`with steer_experts(s, {layer: {expert: amount}}):` add `amount` to those router logits."""

    name = "steer_experts"
    example = "{3: {7: 2.0}}"

    def _check(self, spec):
        out = {}
        for layer, deltas in self._spec_dict(spec).items():
            layer = self._layer(layer)
            if not isinstance(deltas, dict) or not deltas:
                raise InterventionError(f"steer_experts takes {{layer: {{expert: amount}}}}, e.g. {self.example}; "
                                        f"layer {layer} got {deltas!r}.")
            checked = {}
            for expert, amount in deltas.items():
                expert = self._expert(layer, expert)
                if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
                    raise InterventionError(f"steering amount for expert {expert} at layer {layer} must be a finite "
                                            f"number, got {amount!r}.")
                checked[expert] = float(amount)
            out[layer] = checked
        return out

    def _transform(self, layer, deltas):
        experts, amounts = list(deltas), list(deltas.values())

        def fn(logits: torch.Tensor) -> torch.Tensor:
            out = logits.clone()
            out[..., experts] += torch.tensor(amounts, dtype=logits.dtype, device=logits.device)
            return out
        return LogitTransform(fn, set(), f"steer {deltas}")


# ---- attention -------------------------------------------------------------------------------------------
class ablate_heads(Intervention):
    """`with ablate_heads(s, {layer: [heads]}):` those heads' outputs are zeroed before o_proj."""

    name = "ablate_heads"
    example = "{5: [0, 3]}"

    def _check(self, spec):
        n_heads = int(self.config.num_attention_heads)
        out = {}
        for layer, heads in self._spec_dict(spec).items():
            layer = self._layer(layer)
            heads = [heads] if _is_int(heads) else list(heads)
            out[layer] = sorted({resolve_index(h, range(n_heads), "head", "this model", InterventionError,
                                               count=n_heads, context=f" (layer {layer})") for h in heads})
        return out

    def _install(self) -> None:
        n_heads = int(self.config.num_attention_heads)
        for layer, heads in self.spec.items():
            attention = self.adapter.attention_module(self.model, layer)
            o_proj = getattr(attention, "o_proj", None)
            if o_proj is None:
                raise InterventionError(f"layer {layer}'s attention ({type(attention).__name__}) has no o_proj.")
            head_dim = adapter_head_dim(self.config)
            hook = o_proj.register_forward_pre_hook(_zero_heads(heads, n_heads, head_dim), with_kwargs=True)
            self._undo.append(hook.remove)


def _zero_heads(heads: list[int], n_heads: int, head_dim: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if x.shape[-1] != n_heads * head_dim:
            raise InterventionError(f"o_proj input has width {x.shape[-1]}, not heads x head_dim = "
                                    f"{n_heads} x {head_dim}: cannot find the heads' slices.")
        x = x.clone()  # never write into the model's own tensor
        x.view(*x.shape[:-1], n_heads, head_dim)[..., heads, :] = 0
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": x})
    return hook


class scale_sinks(Intervention):
    """`with scale_sinks(s, {layer: factor}):` gpt-oss attention-sink logits multiplied by `factor`.

    Note that a sink logit of 0 (factor 0.0) still takes attention: exp(0) = 1 against the other keys.
    The sinks Parameter is swapped for a scaled copy; the original object is put back on exit."""

    name = "scale_sinks"
    example = "{5: 0.0}"

    def _check(self, spec):
        if not self.adapter.has_sinks:
            raise InterventionError(f"model family {self.adapter.family} has no attention sinks: scale_sinks "
                                    "works on models with learned sink logits (gpt-oss).")
        out = {}
        for layer, factor in self._spec_dict(spec).items():
            layer = self._layer(layer)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise InterventionError(f"sink scale for layer {layer} must be a finite number, got {factor!r}.")
            out[layer] = float(factor)
        return out

    def _install(self) -> None:
        for layer, factor in self.spec.items():
            attention = self.adapter.attention_module(self.model, layer)
            original = getattr(attention, "sinks", None)
            if original is None:
                raise InterventionError(f"layer {layer}'s attention ({type(attention).__name__}) has no sinks.")
            if original.device.type == "meta":
                raise InterventionError(f"layer {layer}'s sinks are offloaded (meta device): scale_sinks cannot "
                                        "change them; load without offloading.")
            scaled = nn.Parameter(original.detach() * factor, requires_grad=False)
            self._undo.append(compat.swap_parameter(attention, "sinks", scaled))


INTERVENTIONS: dict[str, Any] = {c.name: c for c in (ablate_experts, force_experts, steer_experts, ablate_heads,
                                                     scale_sinks)}
