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

import ctypes
import functools
import itertools
import sys
import warnings
from typing import Iterable

import torch

from workbench import arguments
from workbench.errors import CaptureError, ContextLengthError
from workbench.inspect.budget import check_budget
from workbench.inspect.routing import Routed, watch_routing
from workbench.inspect.spec import WHAT, CaptureSpec, Record  # noqa: F401 (WHAT re-exported)
from workbench.chat import inputs as input_rule
from workbench.inspect.trace import BatchTrace, Trace
from workbench.model import compat
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
        self.records: list[list[Record]] = []  # one entry per forward: a Record per batch row
        self._handles: list = []
        self._restore: list = []
        self._current: list[Record] | None = None  # the rows of the forward in progress
        self._tokens = 0  # tokens per row of that forward (expert points' positions are flat: row * tokens + t)

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
        if spec.points:
            from workbench.inspect.taps import Taps

            taps = Taps(model, adapter, [(p, self._point_recorder(p)) for p in spec.resolved_points()])
            taps.__enter__()
            self._restore.append(lambda: taps.__exit__(None, None, None))

    def _install_attention(self) -> None:
        layers = self.spec.layers
        modules = {id(self.adapter.attention_module(self.model, i)): i for i in layers}
        configs = {id(c): c for c in [self.model.config] + [self.adapter.attention_module(self.model, i).config
                                                             for i in layers]}
        original = compat.attention_implementation(text_config(self.model.config))
        # Keep "flash" in the name when the original has it: transformers checks the name for "flash".
        name = f"workbench_capture_{next(_names)}_{original.replace('/', '_')}"
        originals: dict = {}

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = modules.get(id(module))
            if layer is not None and self._current is not None:
                self._record_attention(layer, module, query, key, kwargs)
            fn = originals.get(type(module))
            if fn is None:
                fn = originals[type(module)] = compat.original_attention(module, original)
            return fn(module, query, key, value, attention_mask, **kwargs)

        self._restore.append(compat.register_attention_function(name, attention, mask_like=original))
        for config in configs.values():
            self._restore.append(compat.set_attention_implementation(config, name))

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

    def trace(self, tokenizer=None, call: int | None = None, channels=None, preset: str | None = None):
        """The Trace of the forward recorded here (`call` picks one when there were several); a BatchTrace
        (one Trace per row, trailing padding cut off) when that forward had a batch of several rows.
        `channels`: per-token channel labels (a list per row for a batch)."""
        if not self.records:
            raise CaptureError("nothing was recorded: run a forward of the model inside `with capture(...)`.")
        if call is None and len(self.records) > 1:
            raise CaptureError(f"{len(self.records)} forwards were recorded (e.g. one per generated token): "
                               f"pick one with cap.trace(call=i), 0..{len(self.records) - 1}.")
        rows = self.records[-1 if call is None else call]
        traces = [Trace.from_record(self.spec, _trim(record), tokenizer,
                                    channels[i] if len(rows) > 1 and channels is not None else channels, preset,
                                    model=self.model, provenance=self.provenance) for i, record in enumerate(rows)]
        return traces[0] if len(rows) == 1 else BatchTrace(traces)

    # ---- the hooks ----------------------------------------------------------------------------
    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = tuple((ids if ids is not None else embeds).shape)
        rows = (shape[0] if len(shape) > 1 else 1) if ids is not None else (shape[0] if len(shape) > 2 else 1)
        tokens = shape[-1] if ids is not None else shape[-2]
        check_budget(self.spec, tokens, self.budget, rows=rows)
        self._tokens = tokens
        mask = kwargs.get("attention_mask")
        records = []
        for r in range(rows):
            record = Record(input_ids=ids.reshape(rows, -1)[r].detach().cpu().clone() if ids is not None else None)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[r].all()):
                record.key_mask = mask[r].detach().to("cpu", torch.bool).clone()
            records.append(record)
        self.records.append(records)
        self._current = records

    def _on_route(self, layer: int, routed: Routed) -> None:
        if self._current is not None:
            n = len(self._current)  # the primitive flattens the batch: [rows * tokens, ...]
            logits = routed.logits.detach().to("cpu", torch.float32).reshape(n, -1, routed.logits.shape[-1])
            indices = routed.indices.detach().to("cpu", torch.int64).reshape(n, -1, routed.indices.shape[-1])
            weights = routed.weights.detach().cpu().reshape(n, -1, routed.weights.shape[-1])
            for r, record in enumerate(self._current):
                record.logits[layer], record.indices[layer] = logits[r].clone(), indices[r].clone()
                record.weights[layer] = weights[r].clone()

    def _residual_hook(self, layer: int):
        def hook(module, args, output):
            if self._current is not None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                for r, record in enumerate(self._current):
                    record.residuals[layer] = _store(out[r], self.spec.value_dtype or out.dtype)
                    record.residual_dtype = str(out.dtype).removeprefix("torch.")
        return hook

    def _point_recorder(self, point):
        """A tap function storing one hook point's value per batch row (expert rows with their positions)."""
        name, key = point.name, point.key

        def record(value, hook):
            rows = self._current
            if rows is None:
                return None
            dtype = torch.float32 if key == "logits" else (self.spec.value_dtype or value.dtype)
            if point.expert is not None:
                tokens = self._tokens
                positions = hook.positions.detach().cpu()
                row_of, position = positions // tokens, positions % tokens
                for r, rec in enumerate(rows):
                    keep = (row_of == r).nonzero().squeeze(1)
                    rec.points[name] = _store(value[keep.to(value.device)], dtype)
                    rec.positions[name] = position[keep].clone()
            else:
                for r, rec in enumerate(rows):
                    rec.points[name] = _store(value[r], dtype)
            return None
        return record

    def _record_attention(self, layer, module, query, key, kwargs) -> None:
        spec = self.spec
        sinks = kwargs.get("s_aux")
        scaling = kwargs.get("scaling")
        dtype = spec.storage_dtype
        for r, record in enumerate(self._current):
            q = query[r] if query.shape[1] == spec.num_heads else query[r].transpose(0, 1)  # [H, T, d]
            k = key[r] if key.shape[1] == spec.num_kv_heads else key[r].transpose(0, 1)
            record.q[layer] = _store(q if len(spec.heads) == spec.num_heads else q[spec.heads], dtype)
            record.k[layer] = _store(k if len(spec.kv_heads) == spec.num_kv_heads else k[spec.kv_heads], dtype)
            record.attn[layer] = {
                "scaling": float(scaling if scaling is not None else getattr(module, "scaling", q.shape[-1] ** -0.5)),
                "window": _int_or_none(kwargs["sliding_window"] if "sliding_window" in kwargs
                                       else getattr(module, "sliding_window", None)),
                "softcap": kwargs.get("softcap"),
                "sinks": None if sinks is None else sinks.detach().to("cpu", torch.float32)[spec.heads].clone(),
                "offset": int(k.shape[1] - q.shape[1]),  # keys from a cache come before the queries
            }


def _trim(record: Record) -> Record:
    """A row of a right-padded batch without its trailing padding: what tracing it alone records. Padding
    elsewhere (left padding) stays, masked by key_mask."""
    mask = record.key_mask
    if mask is None or not bool(mask.any()) or any(info["offset"] for info in record.attn.values()):
        return record
    n = int(mask.nonzero().max()) + 1
    kept = mask[:n]
    return Record(
        input_ids=None if record.input_ids is None else record.input_ids[:n],
        key_mask=None if bool(kept.all()) else kept,
        q={layer: x[:, :n] for layer, x in record.q.items()}, k={layer: x[:, :n] for layer, x in record.k.items()},
        attn=record.attn, logits={layer: x[:n] for layer, x in record.logits.items()},
        indices={layer: x[:n] for layer, x in record.indices.items()},
        weights={layer: x[:n] for layer, x in record.weights.items()},
        residuals={layer: x[:n] for layer, x in record.residuals.items()}, residual_dtype=record.residual_dtype,
        points={name: _trim_point(name, x, record.positions.get(name), n) for name, x in record.points.items()},
        positions={name: pos[pos < n] for name, pos in record.positions.items()})


def _trim_point(name: str, x: torch.Tensor, positions, n: int) -> torch.Tensor:
    if positions is not None:  # expert rows: those of real tokens
        return x[positions < n]
    if any(name.endswith(k) for k in (".attn.q", ".attn.k", ".attn.v")):  # [heads, T, head_dim]
        return x[:, :n]
    return x[:n]


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def capture(model, adapter: Adapter, what: Iterable[str] | None = None, layers=None, heads=None,
            dtype: torch.dtype | None = None, budget=None) -> Capture:
    """Record routing/attention/residuals of any forward run inside `with capture(...) as cap:`."""
    return Capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype, budget=budget)


def trace(model, tokenizer, adapter: Adapter, inputs, what=None, layers=None, heads=None, budget="2GB",
          dtype: torch.dtype | None = None, preset: str | None = None, provenance: list[dict] | None = None,
          allow_longer: bool = False):
    """One forward over `inputs` with capture; returns a Trace, or a BatchTrace for a batch.

    inputs: raw text, wb.user(text) (a chat turn), chat messages, a Generation or token ids (workbench.chat.inputs);
    or a list of those (a batch: one right-padded forward; `t[i]` is row i's Trace, equal to tracing it alone,
    with no padding in it).
    what: any of "routing", "attention", "residuals" (default: routing and attention; attention on dense
    models). dtype: storage for q/k/residuals (default: the model's dtype if 16-bit, else float16;
    torch.float32 for exact work on a float32 model). budget: '2GB', '500MB', bytes or None, for the whole batch.
    provenance: what was active (interventions, steering, hooks), recorded in the trace and its file.
    allow_longer: trace an input longer than the model's context (with a warning) instead of refusing it.
    """
    batch, given = input_rule.items(inputs, error=CaptureError, where="the trace's input")
    vocab = int(getattr(text_config(model.config), "vocab_size", 0) or 0)
    items = [input_rule.token_ids(tokenizer, x, error=CaptureError, vocab_size=vocab,
                                  where=f"trace input {i}" if batch else "the trace's input")
             for i, x in enumerate(given)]
    longest = max(len(ids) for ids, _ in items)
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if limit and longest > limit:
        message = (f"this input has {longest} tokens, past the model's context of {limit} tokens: positions beyond it "
                   "were never trained and the trace would describe a model out of its range.")
        if not allow_longer:
            raise ContextLengthError(message + " Shorten it, or pass allow_longer=True to trace it anyway.")
        warnings.warn(message, stacklevel=3)
    cap = capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype)
    width = max(len(ids) for ids, _ in items)
    check_budget(cap.spec, width, budget, rows=len(items))  # before any hook is installed
    device = input_device(model)
    kwargs = {}
    if batch:
        pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                    if t is not None), 0)
        input_ids, kwargs["attention_mask"] = pad_right([ids for ids, _ in items], pad, device)
    else:
        input_ids = torch.tensor([items[0][0]], dtype=torch.int64, device=device)
    cap.provenance = list(provenance or [])
    try:
        with torch.no_grad(), cap:
            model(input_ids=input_ids, use_cache=False, **kwargs)
        channels = [c for _, c in items] if batch else items[0][1]
        return cap.trace(tokenizer, channels=channels, preset=preset)
    finally:
        release_freed_memory()


def release_freed_memory() -> None:
    """Return the forward's freed temporaries to the system (glibc's malloc_trim), so the next large request starts
    from what is really in use: measured on the full-size gpt-oss-20b, the allocator otherwise kept ~0.6 GB of a
    prefill's and a trace's freed activations resident, and the next trace's peak came on top of it. Elsewhere
    (another libc, another OS) nothing happens."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def pad_right(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] of a batch: each row left-aligned, pads after, so positions stay
    0..n-1 and every real token sees exactly what it sees alone (causal attention never looks right)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
        mask[i, :len(x)] = 1
    return input_ids.to(device), mask.to(device)
