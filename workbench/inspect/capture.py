"""Hooks that record what a forward pass computed, without changing a single bit of it.

    with capture(model, adapter, what=["routing", "attention"], layers=[0, 3]) as cap:
        model(input_ids)
    t = cap.trace(tokenizer)

- Routing is read at the MLP level on every preset through the router-logits primitive
  (workbench/inspect/routing.py): the MLP input, the router's own arithmetic, the active interventions'
  logit transforms, then `adapter.route`. Under mxfp4 the MLP never calls its router module, so hooks on
  the router would never fire; this way works on every path, and records what the model really used.
- Attention goes through transformers' AttentionInterface: a function registered under a private name
  records the post-RoPE query and key (T*d per head instead of T*T) plus what the mask needs (sliding
  window, sinks, scaling, softcap), then calls the model's own implementation and returns its result
  untouched. The private name is registered in AttentionMaskInterface with the original
  implementation's mask function: without that, transformers silently drops the causal mask.
- Everything is undone in `__exit__` (and if installing fails half-way): hooks removed, names
  unregistered, each config's attention implementation written back.
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterable

import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from workbench.errors import CaptureError
from workbench.inspect.budget import check_budget
from workbench.inspect.routing import Routed, watch_routing
from workbench.inspect.spec import WHAT, CaptureSpec, Record  # noqa: F401 (WHAT re-exported)
from workbench.inspect.trace import Trace, as_token_ids
from workbench.model.adapters import Adapter, input_device, text_config

_names = itertools.count()


def _store(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Detach to the CPU in `dtype`; values float16 cannot hold stay float32 rather than become inf."""
    if dtype == torch.float16 and x.dtype != torch.float16 and x.numel() and x.abs().max() > 65000:
        dtype = torch.float32
    y = x.detach().to("cpu", dtype)
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # never keep a view into the model's tensors


class Capture:
    """Context manager recording routing, attention q/k and residuals of every forward inside it."""

    def __init__(self, model, adapter: Adapter, what: Iterable[str] | None = None, layers=None, heads=None,
                 dtype: torch.dtype | None = None, budget=None):
        self.model, self.adapter = model, adapter
        self.spec = CaptureSpec.for_model(model, adapter, what, layers, heads, dtype)
        self.budget = budget
        self.provenance: list[dict] = []  # what was active (interventions, steering, hooks); set by the session
        self.records: list[Record] = []
        self._handles: list = []
        self._restore: list = []
        self._current: Record | None = None

    # ---- installing and removing --------------------------------------------------------------
    def __enter__(self) -> "Capture":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _install(self) -> None:
        model, adapter, spec = self.model, self.adapter, self.spec
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        if spec.routed_layers:
            watch = watch_routing(model, adapter, spec.routed_layers, self._on_route)
            watch.__enter__()
            self._restore.append(lambda: watch.__exit__(None, None, None))
        if "residuals" in spec.what:
            for layer in spec.layers:
                module = adapter.layer_list(model)[layer]
                self._handles.append(module.register_forward_hook(self._residual_hook(layer)))
        if "attention" in spec.what:
            self._install_attention()

    def _install_attention(self) -> None:
        layers = self.spec.layers
        modules = {id(self.adapter.attention_module(self.model, i)): i for i in layers}
        configs = {id(c): c for c in [self.model.config] + [self.adapter.attention_module(self.model, i).config
                                                             for i in layers]}
        original = text_config(self.model.config)._attn_implementation or "eager"
        # Keep "flash" in the name when the original has it: transformers checks the name for "flash".
        name = f"workbench_capture_{next(_names)}_{original.replace('/', '_')}"
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else None
        originals: dict = {}

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = modules.get(id(module))
            if layer is not None and self._current is not None:
                self._record_attention(layer, module, query, key, kwargs)
            fn = originals.get(type(module))
            if fn is None:
                fn = originals[type(module)] = _original_attention(module, original)
            return fn(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        self._restore.append(lambda: AttentionInterface._global_mapping.pop(name, None))
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
            self._restore.append(lambda: AttentionMaskInterface._global_mapping.pop(name, None))
        for config in configs.values():
            previous = config._attn_implementation_internal
            self._restore.append(lambda c=config, p=previous: setattr(c, "_attn_implementation_internal", p))
            config._attn_implementation_internal = name  # the attribute itself: no sub-config recursion

    def _remove(self) -> None:
        errors = []
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in reversed(self._restore):
            try:
                undo()
            except Exception as e:  # keep undoing the rest; report afterwards
                errors.append(e)
        self._restore.clear()
        self._current = None
        if errors:
            raise errors[0]

    def trace(self, tokenizer=None, call: int | None = None, channels=None, preset: str | None = None) -> Trace:
        """The Trace of the forward recorded here (`call` picks one when there were several)."""
        if not self.records:
            raise CaptureError("nothing was recorded: run a forward of the model inside `with capture(...)`.")
        if call is None and len(self.records) > 1:
            raise CaptureError(f"{len(self.records)} forwards were recorded (e.g. one per generated token): "
                               f"pick one with cap.trace(call=i), 0..{len(self.records) - 1}.")
        return Trace.from_record(self.spec, self.records[-1 if call is None else call], tokenizer, channels, preset,
                                 model=self.model, provenance=self.provenance)

    # ---- the hooks ----------------------------------------------------------------------------
    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = tuple((ids if ids is not None else embeds).shape)
        if len(shape) > 1 and shape[0] != 1:
            raise CaptureError(f"capture records one sequence at a time; this forward has a batch of {shape[0]}.")
        tokens = shape[-1] if ids is not None else shape[-2]
        check_budget(self.spec, tokens, self.budget)
        mask = kwargs.get("attention_mask")
        record = Record(input_ids=ids.reshape(-1).detach().cpu().clone() if ids is not None else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            record.key_mask = mask[0].detach().to("cpu", torch.bool).clone()
        self.records.append(record)
        self._current = record

    def _on_route(self, layer: int, routed: Routed) -> None:
        if self._current is not None:
            self._current.logits[layer] = routed.logits.detach().to("cpu", torch.float32)
            self._current.indices[layer] = routed.indices.detach().to("cpu", torch.int64)
            self._current.weights[layer] = routed.weights.detach().cpu().clone()

    def _residual_hook(self, layer: int):
        def hook(module, args, output):
            if self._current is not None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                self._current.residuals[layer] = _store(out[0], self.spec.storage_dtype)
                self._current.residual_dtype = str(out.dtype).removeprefix("torch.")
        return hook

    def _record_attention(self, layer, module, query, key, kwargs) -> None:
        spec = self.spec
        q = query[0] if query.shape[1] == spec.num_heads else query[0].transpose(0, 1)  # [H, T, d]
        k = key[0] if key.shape[1] == spec.num_kv_heads else key[0].transpose(0, 1)
        sinks = kwargs.get("s_aux")
        scaling = kwargs.get("scaling")
        dtype = spec.storage_dtype
        self._current.q[layer] = _store(q if len(spec.heads) == spec.num_heads else q[spec.heads], dtype)
        self._current.k[layer] = _store(k if len(spec.kv_heads) == spec.num_kv_heads else k[spec.kv_heads], dtype)
        self._current.attn[layer] = {
            "scaling": float(scaling if scaling is not None else getattr(module, "scaling", q.shape[-1] ** -0.5)),
            "window": _int_or_none(kwargs["sliding_window"] if "sliding_window" in kwargs
                                   else getattr(module, "sliding_window", None)),
            "softcap": kwargs.get("softcap"),
            "sinks": None if sinks is None else sinks.detach().to("cpu", torch.float32)[spec.heads].clone(),
            "offset": int(k.shape[1] - q.shape[1]),  # keys from a cache come before the queries
        }


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def _original_attention(module, implementation: str):
    """The attention function the module would call: its modeling file's interface, eager by default."""
    modeling = sys.modules[type(module).__module__]
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    eager = getattr(modeling, "eager_attention_forward", None)
    if implementation == "eager" and eager is not None:
        return eager
    if eager is None:
        from transformers.integrations.sdpa_attention import (
            sdpa_attention_forward as eager,  # last resort
        )
    return interface.get_interface(implementation, eager)


def capture(model, adapter: Adapter, what: Iterable[str] | None = None, layers=None, heads=None,
            dtype: torch.dtype | None = None, budget=None) -> Capture:
    """Record routing/attention/residuals of any forward run inside `with capture(...) as cap:`."""
    return Capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype, budget=budget)


def trace(model, tokenizer, adapter: Adapter, inputs, what=None, layers=None, heads=None, budget="2GB",
          dtype: torch.dtype | None = None, preset: str | None = None, provenance: list[dict] | None = None) -> Trace:
    """One forward over `inputs` with capture; returns a Trace.

    what: any of "routing", "attention", "residuals" (default: routing and attention; attention on dense
    models). dtype: storage for q/k/residuals (default: the model's dtype if 16-bit, else float16;
    torch.float32 for exact work on a float32 model). budget: '2GB', '500MB', bytes or None.
    provenance: what was active (interventions, steering, hooks), recorded in the trace and its file.
    """
    ids, channels = as_token_ids(tokenizer, inputs)
    if not ids:
        raise CaptureError("nothing to trace: the input has no tokens.")
    cap = capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype)
    check_budget(cap.spec, len(ids), budget)  # before any hook is installed
    input_ids = torch.tensor([ids], dtype=torch.int64, device=input_device(model))
    cap.provenance = list(provenance or [])
    with torch.no_grad(), cap:
        model(input_ids=input_ids, use_cache=False)
    return cap.trace(tokenizer, channels=channels, preset=preset)
