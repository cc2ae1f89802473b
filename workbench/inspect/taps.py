"""Taps: functions attached at hook points (workbench/inspect/points.py) for the duration of a `with`.

    with Taps(model, adapter, [(point, fn), ...]):
        model(input_ids)

`fn(value, hook)` sees the live tensor at the point and may return a replacement (None keeps it). Captures record
through taps, and `s.hook`, `s.set`, `s.ablate` and zero-ablation of experts change the model through them: one
mechanism for reading and writing. What a function sees, per kind:

- residuals, attn.out, mlp.out: `[batch, T, d_model]`; attn.z: `[batch, T, heads, head_dim]` (o_proj's input);
  attn.q/k/v: `[batch, heads, T, head_dim]` as the attention kernel receives them (after RoPE); logits:
  `[batch, T, vocab]`.
- router points: `[batch*T, experts]` / `[batch*T, top_k]`, flattened as the MLP computes them (read-only except
  logits).
- expert points: `[rows, width]`, the rows routed to that expert, with `hook.positions` their flat token indices
  (batch row * T + position), in ascending order.

Where each is reached: forward (pre-)hooks on the decoder layer (resid_pre/post), the MLP's norm (resid_mid), the
attention module (attn.out), o_proj (attn.z), the MLP (mlp.out) and the output embedding (logits); q/k/v through an
attention function registered with transformers (the capture's mechanism); router logits through the routing
primitive (workbench/inspect/routing.py); expert stages through workbench/model/expert_stages.py. Everything is
undone on exit, also on error, in reverse order (an ExitStack).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from workbench.errors import HookPointError
from workbench.inspect.points import HookPoint
from workbench.inspect.routing import LogitTransform, add_router_transform, watch_routing
from workbench.model import compat, expert_stages
from workbench.model.adapters import Adapter, text_config

_names = itertools.count()


@dataclasses.dataclass
class Hook:
    """What a tap function gets besides the value: the point, and for expert rows their token positions."""

    point: HookPoint
    positions: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def layer(self) -> int | None:
        return self.point.layer


Fn = Callable[[torch.Tensor, Hook], "torch.Tensor | None"]


def _apply(fns: list[tuple[HookPoint, Fn]], x: torch.Tensor, positions=None) -> torch.Tensor:
    for point, fn in fns:
        new = fn(x, Hook(point, positions))
        if new is not None:
            if not isinstance(new, torch.Tensor) or new.shape != x.shape:
                raise HookPointError(f"a function at {point.name} returned "
                                     f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}; "
                                     f"it must return None or a tensor of the value's shape {tuple(x.shape)}.")
            x = new.to(x.dtype)
    return x


def mlp_norm(layer_module: nn.Module) -> nn.Module | None:
    """The norm in front of a decoder layer's MLP: its input is resid_mid (Gemma 2/3 name it pre_feedforward)."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"):
        if hasattr(layer_module, name):
            return getattr(layer_module, name)
    return None


class Taps:
    """Context manager: `fns` [(HookPoint, fn)] attached while inside."""

    def __init__(self, model: nn.Module, adapter: Adapter, fns: list[tuple[HookPoint, Fn]], preset: str | None = None):
        self.model, self.adapter, self.preset = model, adapter, preset
        self.fns = list(fns)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Taps":
        stack = contextlib.ExitStack()
        try:
            self._install(stack)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return False

    # ---- installing -----------------------------------------------------------------------------------------
    def _install(self, stack: contextlib.ExitStack) -> None:
        by_key: dict[str, dict] = defaultdict(lambda: defaultdict(list))
        for point, fn in self.fns:
            by_key[point.key][point.layer if point.expert is None else (point.layer, point.expert)].append((point, fn))
        layers = self.adapter.layer_list(self.model)
        for key, per in by_key.items():
            if key == "resid_pre":
                for layer, fns in per.items():
                    stack.callback(layers[layer].register_forward_pre_hook(_pre_hook(fns), with_kwargs=True).remove)
            elif key == "resid_post":
                for layer, fns in per.items():
                    stack.callback(layers[layer].register_forward_hook(_out_hook(fns)).remove)
            elif key == "resid_mid":
                for layer, fns in per.items():
                    norm = mlp_norm(layers[layer])
                    if norm is None:
                        raise HookPointError(f"{fns[0][0].name}: this {self.adapter.family} decoder layer has no norm "
                                             "in front of its MLP to read the stream at.")
                    stack.callback(norm.register_forward_pre_hook(_pre_hook(fns), with_kwargs=True).remove)
            elif key == "attn.out":
                for layer, fns in per.items():
                    module = self.adapter.attention_module(self.model, layer)
                    stack.callback(module.register_forward_hook(_out_hook(fns)).remove)
            elif key == "attn.z":
                for layer, fns in per.items():
                    o_proj = getattr(self.adapter.attention_module(self.model, layer), "o_proj", None)
                    if o_proj is None:
                        raise HookPointError(f"{fns[0][0].name}: this attention module has no o_proj.")
                    heads = int(text_config(self.model.config).num_attention_heads)
                    stack.callback(o_proj.register_forward_pre_hook(_z_hook(fns, heads), with_kwargs=True).remove)
            elif key == "mlp.out":
                for layer, fns in per.items():
                    stack.callback(self.adapter.mlp_module(self.model, layer).register_forward_hook(_out_hook(fns)).remove)
            elif key == "logits":
                head = self.model.get_output_embeddings()
                stack.callback(head.register_forward_hook(_out_hook(per[None])).remove)
        attention = {k: per for k, per in by_key.items() if k in ("attn.q", "attn.k", "attn.v")}
        if attention:
            self._install_attention(stack, attention)
        router = {k: per for k, per in by_key.items() if k.startswith("mlp.router.")}
        if router:
            self._install_router(stack, router)
        experts = {k: per for k, per in by_key.items() if k.startswith("mlp.experts.")}
        if experts:
            self._install_experts(stack, experts)
        for key in by_key:
            if key in ("attn.pattern", "attn.sink"):
                point = next(iter(by_key[key].values()))[0][0]
                raise HookPointError(f"{point.name} is read in traces only: {point.kind.why_not}.")

    def _install_attention(self, stack, attention: dict) -> None:
        per_layer: dict[int, dict[str, list]] = defaultdict(dict)
        for key, per in attention.items():
            for layer, fns in per.items():
                per_layer[layer][key] = fns
        modules = {id(self.adapter.attention_module(self.model, i)): i for i in per_layer}
        configs = {id(c): c for c in [self.model.config] + [self.adapter.attention_module(self.model, i).config
                                                             for i in per_layer]}
        original = compat.attention_implementation(text_config(self.model.config))
        name = f"workbench_taps_{next(_names)}_{original.replace('/', '_')}"  # "flash" kept in the name on purpose
        originals: dict = {}

        def attention_fn(module, query, key, value, attention_mask, **kwargs):
            fns = per_layer.get(modules.get(id(module), -1))
            if fns:
                query = _apply(fns["attn.q"], query) if "attn.q" in fns else query
                key = _apply(fns["attn.k"], key) if "attn.k" in fns else key
                value = _apply(fns["attn.v"], value) if "attn.v" in fns else value
            fn = originals.get(type(module))
            if fn is None:
                fn = originals[type(module)] = compat.original_attention(module, original)
            return fn(module, query, key, value, attention_mask, **kwargs)

        stack.callback(compat.register_attention_function(name, attention_fn, mask_like=original))
        for config in configs.values():
            stack.callback(compat.set_attention_implementation(config, name))

    def _install_router(self, stack, router: dict) -> None:
        reads = {k: per for k, per in router.items() if k != "mlp.router.logits"}
        for layer, fns in router.get("mlp.router.logits", {}).items():
            mlp = self.adapter.mlp_module(self.model, layer)
            transform = LogitTransform(lambda logits, fns=fns: _apply(fns, logits), set(), f"taps at layer {layer}")
            stack.callback(add_router_transform(mlp, getattr(mlp, self.adapter.router), transform))
        if reads:
            layers = sorted({layer for per in reads.values() for layer in per})

            def on_route(layer, routed):
                for key, attr in (("mlp.router.indices", "indices"), ("mlp.router.weights", "weights")):
                    fns = reads.get(key, {}).get(layer)
                    if fns:
                        _apply(fns, getattr(routed, attr))  # read-only: a replacement would not reach the model
            watch = watch_routing(self.model, self.adapter, layers, on_route)
            stack.enter_context(watch)

    def _install_experts(self, stack, experts: dict) -> None:
        per_layer: dict[int, dict[tuple[int, str], list]] = defaultdict(dict)
        for key, per in experts.items():
            for (layer, expert), fns in per.items():
                per_layer[layer][(expert, key.rsplit(".", 1)[1])] = fns
        for layer, wanted in per_layer.items():
            module = getattr(self.adapter.mlp_module(self.model, layer), self.adapter.experts)
            stack.callback(expert_stages.enable(module, _stage_dispatch(wanted), self.preset))


# ---- the hook functions ------------------------------------------------------------------------------------
def _pre_hook(fns):
    def hook(module, args, kwargs):
        if args:
            new = _apply(fns, args[0])
            return (new,) + tuple(args[1:]), kwargs
        new = _apply(fns, kwargs["hidden_states"])
        return args, dict(kwargs, hidden_states=new)
    return hook


def _out_hook(fns):
    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            new = _apply(fns, output[0])
            return type(output)((new,) + tuple(output[1:])) if new is not output[0] else None
        new = _apply(fns, output)
        return new if new is not output else None
    return hook


def _z_hook(fns, heads: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        z = x.view(*x.shape[:-1], heads, x.shape[-1] // heads)
        new = _apply(fns, z)
        if new is z:
            return None
        new = new.reshape(x.shape)
        return ((new,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, input=new))
    return hook


def _stage_dispatch(wanted: dict[tuple[int, str], list]):
    stages = {s for _, s in wanted}

    def on_stage(stage: str, x: torch.Tensor, expert_of_row: torch.Tensor, token_of_row: torch.Tensor):
        if stage not in stages:
            return x
        copied = False
        for (expert, s), fns in wanted.items():
            if s != stage:
                continue
            rows = (expert_of_row == expert).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            order = torch.argsort(token_of_row[rows], stable=True)
            rows = rows[order]
            value = x[rows]
            new = _apply(fns, value, positions=token_of_row[rows])
            if new is not value:
                if not copied:
                    x, copied = x.clone(), True
                x[rows] = new
        return x
    return on_stage
