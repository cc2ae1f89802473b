"""Traces: one forward over a text or a finished generation, with routing, attention and residuals.

    t = trace(model, tokenizer, adapter, generation, what=("routing", "attention"))
    t.routing.indices          # [layers, tokens, k] experts each token was sent to
    t.attention(5, head=3)     # [tokens, tokens] probabilities, computed now from the recorded q and k
    t.sink_mass                # [layers, heads, tokens] share of each query's attention the sink took
    t.save("run.wbtrace"); Trace.load("run.wbtrace")

Attention is recorded as post-RoPE query and key (T*d per head) and turned into patterns only for the
layer and head asked for, with the model's own arithmetic: scores = q.k^T * scaling (then softcap if the
model has one), the causal mask (key j visible to query i iff j <= i), the sliding window when the layer
has one (and i - window < j, as transformers' masks do), padding, and the sink logit appended as an extra
column and dropped after the softmax (gpt-oss). Patterns are computed in float32 in blocks of queries,
so a sliding-window layer never materialises more than its band plus the answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import weakref
from pathlib import Path

import torch

from workbench.model.adapters import Adapter, adapter_for
from workbench.inspect.capture import Capture, CaptureError, Record, capture, resolve_indices
from workbench.errors import CaptureBudgetError, TraceFileError, TraceModelMismatchError

FORMAT, VERSION = "workbench-trace", 1
_QUERY_BLOCK = 256


# ---- budgets ----------------------------------------------------------------------------------------
def parse_bytes(budget) -> int:
    """'2GB', '500MB', '1.5GiB', 10**9 -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(budget), re.IGNORECASE)
    if not m:
        raise CaptureBudgetError(f"budget={budget!r} is not a size: use e.g. '2GB', '500MB' or a number of bytes.")
    unit = (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2).upper() or "_")
    return int(float(m.group(1)) * unit)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def trace_bytes(config, adapter: Adapter | None = None, tokens: int = 1, what=("routing", "attention"),
                layers=None, heads=None, dtype: torch.dtype = torch.bfloat16, moe_layers=None) -> dict[str, int]:
    """Bytes a trace needs, from the config alone: {"attention", "routing", "residuals", "total"}.

    Attention keeps q for each requested head and k for the KV heads they read; routing keeps float32 logits,
    int64 indices and the applied weights (at most 4 bytes); residuals keep one hidden vector per token.
    """
    adapter = adapter or adapter_for(config)[0]
    n_layers = int(config.num_hidden_layers)
    layers = resolve_indices(layers, n_layers, "layer")
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    heads = resolve_indices(heads, n_heads, "head")
    kv = len({h // (n_heads // n_kv) for h in heads})
    size = torch.finfo(dtype).bits // 8
    out = {"attention": 0, "routing": 0, "residuals": 0}
    if "attention" in what:
        out["attention"] = tokens * len(layers) * (len(heads) + kv) * head_dim * size
    if "routing" in what and adapter.is_moe:
        routed = [i for i in (moe_layers if moe_layers is not None else range(n_layers)) if i in layers]
        e, k = adapter.num_experts(config), adapter.top_k(config)
        out["routing"] = tokens * len(routed) * (e * 4 + k * 8 + k * 4)
    if "residuals" in what:
        out["residuals"] = tokens * len(layers) * int(config.hidden_size) * size
    out["total"] = sum(out.values())
    return out


def check_budget(cap: Capture, tokens: int) -> None:
    """Raise CaptureBudgetError, naming cheaper requests that fit, when `cap` would exceed its budget."""
    budget = parse_bytes(cap.budget)
    cfg, dtype = cap.config, cap.dtype

    def size(**kw) -> int:
        args = dict(what=cap.what, layers=cap.layers, heads=cap.heads)
        args.update(kw)
        return trace_bytes(cfg, cap.adapter, tokens, dtype=dtype, moe_layers=cap.routed_layers, **args)["total"]

    need = size()
    if need <= budget:
        return
    options = []
    if "routing" in cap.what:
        options.append(f"routing only (what=['routing']): {_human(size(what=('routing',)))}")
    if "attention" in cap.what:
        per_layer = size(what=("attention",), layers=cap.layers[:1])
        fit = max(1, int(budget // max(per_layer, 1)))
        if fit < len(cap.layers):
            few = cap.layers[:fit]
            options.append(f"attention on {fit} layer(s) (layers={few if fit <= 4 else f'{few[:2]}...'}): "
                           f"{_human(size(what=('attention',), layers=few))}")
        options.append(f"attention for one head per layer (heads=[{cap.heads[0]}]): "
                       f"{_human(size(what=('attention',), heads=cap.heads[:1]))}")
    if "residuals" in cap.what:
        options.append(f"without residuals: {_human(size(what=tuple(w for w in cap.what if w != 'residuals')))}"
                       if len(cap.what) > 1 else "fewer layers")
    fit_tokens = int(tokens * budget / need)
    options.append(f"the same request on the first {fit_tokens} tokens")
    raise CaptureBudgetError(
        f"This trace needs {_human(need)} ({tokens} tokens, {len(cap.layers)} layers, {len(cap.heads)} heads, "
        f"{', '.join(cap.what)}, {str(dtype).removeprefix('torch.')}), over the budget of {_human(budget)}. "
        f"Cheaper requests: " + "; ".join(options) + ". Or raise the budget (budget='8GB').")


# ---- the trace --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tokens:
    ids: list[int]
    strings: list[str]
    channels: list[str] | None = None  # per token, when traced from a Generation ("prompt" for the prompt)

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class Routing:
    layers: list[int]  # which model layers the rows are
    indices: torch.Tensor  # [layers, tokens, k] int64
    weights: torch.Tensor  # [layers, tokens, k], the weights the model applied (its dtype)
    logits: torch.Tensor  # [layers, tokens, experts] float32

    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise CaptureError(f"routing was captured for layers {self.layers}, not layer {layer}.")
        return self.layers.index(layer)


@dataclasses.dataclass
class LogitLens:
    ids: torch.Tensor  # [tokens, k]
    probs: torch.Tensor  # [tokens, k] float32
    strings: list[list[str]]


def config_hash(config) -> str:
    """sha256 of the config (sorted JSON) without what differs between presets of the same model."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                "_attn_implementation_autoset", "attn_implementation", "_commit_hash", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict", "_experts_implementation"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class Trace:
    """Routing, attention (as q and k) and residuals of one forward pass over one sequence."""

    def __init__(self, tokens: Tokens, meta: dict, tensors: dict[str, torch.Tensor], model=None):
        self.tokens, self.meta, self._t = tokens, meta, tensors
        self._model = weakref.ref(model) if model is not None else None
        self._sink_mass = None
        r = meta.get("routing_layers") or []
        self.routing: Routing | None = Routing(
            r, tensors["routing.indices"], tensors["routing.weights"], tensors["routing.logits"]) if r else None

    @property
    def layers(self) -> list[int]:
        """Layers whose attention was captured."""
        return self.meta["attention_layers"]

    @property
    def heads(self) -> list[int]:
        return self.meta["heads"]

    def __repr__(self) -> str:
        return (f"Trace({self.meta.get('model')!r}, {len(self.tokens)} tokens, {', '.join(self.meta['what'])}, "
                f"layers={_short(self.meta['layers'])}, heads={_short(self.heads)})")

    # ---- attention ------------------------------------------------------------------------------
    def _check(self, layer: int, head=None) -> tuple[int, list[int]]:
        if "attention" not in self.meta["what"]:
            raise CaptureError("attention was not captured: trace with what=('attention', ...).")
        n = self.meta["num_layers"]
        if isinstance(layer, int) and -n <= layer < 0:
            layer += n
        if layer not in self.layers:
            raise CaptureError(f"layer {layer!r} was not captured: this trace has attention for layers "
                               f"{_short(self.layers)} (the model has layers 0..{n - 1}).")
        heads = self.heads if head is None else [head]
        for h in heads:
            if h not in self.heads:
                raise CaptureError(f"head {h!r} was not captured: this trace has heads {_short(self.heads)} "
                                   f"(the model has heads 0..{self.meta['num_heads'] - 1}).")
        return layer, heads

    def _blocks(self, layer: int, heads: list[int]):
        """Yield (query start, query stop, key start, probs [h, q, keys], sink probs [h, q] or None)."""
        info = self.meta["attention"][str(layer)]
        pos = [self.heads.index(h) for h in heads]
        kv_pos = [self.meta["kv_heads"].index(h // self.meta["groups"]) for h in heads]
        q = self._t[f"q.{layer}"][pos].float()
        k = self._t[f"k.{layer}"][kv_pos].float()
        sinks = self._t.get(f"sinks.{layer}")
        window, offset, scaling, softcap = info["window"], info["offset"], info["scaling"], info["softcap"]
        key_mask = self._t.get("key_mask")
        n_q, n_k = q.shape[1], k.shape[1]
        for a in range(0, n_q, _QUERY_BLOCK):
            b = min(n_q, a + _QUERY_BLOCK)
            lo = 0 if window is None else max(0, a + offset - window + 1)
            hi = min(n_k, b + offset)
            scores = torch.matmul(q[:, a:b], k[:, lo:hi].transpose(1, 2)) * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            i = torch.arange(a, b)[:, None] + offset
            j = torch.arange(lo, hi)[None, :]
            visible = j <= i
            if window is not None:
                visible &= j > i - window
            if key_mask is not None:
                visible &= key_mask[lo:hi][None, :]
            scores = scores.masked_fill(~visible, float("-inf"))
            if sinks is not None:
                sink = sinks[pos].reshape(-1, 1, 1).expand(-1, b - a, 1)
                combined = torch.cat([scores, sink], dim=-1)
                combined = combined - combined.max(dim=-1, keepdim=True).values
                probs = torch.softmax(combined, dim=-1)
                yield a, b, lo, probs[..., :-1], probs[..., -1]
            else:
                yield a, b, lo, torch.softmax(scores, dim=-1).nan_to_num(0.0), None

    def attention(self, layer: int, head: int | None = None, band: bool = False) -> torch.Tensor:
        """Attention probabilities, float32: [tokens, tokens] for one head, [heads, tokens, tokens] for head=None.

        band=True on a sliding-window layer returns [.., tokens, window]: column w is key i - window + 1 + w.
        Rows of a layer with sinks sum to 1 - sink_mass.
        """
        layer, heads = self._check(layer, head)
        window = self.meta["attention"][str(layer)]["window"]
        n_q, n_k = len(self.tokens), self._t[f"k.{layer}"].shape[1]
        offset = self.meta["attention"][str(layer)]["offset"]
        if band and window is None:
            raise CaptureError(f"layer {layer} has full attention, not a sliding window: use band=False.")
        out = torch.zeros(len(heads), n_q, window if band else n_k)
        for a, b, lo, probs, _ in self._blocks(layer, heads):
            if band:
                start = torch.arange(a, b)[:, None] + offset - window + 1 + torch.arange(window)[None, :] - lo
                ok = (start >= 0) & (start < probs.shape[-1])
                got = probs.gather(-1, start.clamp(0, probs.shape[-1] - 1).expand(len(heads), -1, -1))
                out[:, a:b] = got * ok
            else:
                out[:, a:b, lo:lo + probs.shape[-1]] = probs
        return out[0] if head is not None else out

    @property
    def sink_mass(self) -> torch.Tensor:
        """[attention layers, heads, tokens] float32: each query's probability taken by the sink (0 without)."""
        if self._sink_mass is None:
            mass = torch.zeros(len(self.layers), len(self.heads), len(self.tokens))
            for row, layer in enumerate(self.layers):
                if f"sinks.{layer}" in self._t:
                    for a, b, _, _, sink in self._blocks(layer, self.heads):
                        mass[row, :, a:b] = sink
            self._sink_mass = mass
        return self._sink_mass

    # ---- residuals and logit lens ---------------------------------------------------------------------
    def residual(self, layer: int) -> torch.Tensor:
        """[tokens, hidden]: the residual stream after decoder layer `layer`."""
        if "residuals" not in self.meta["what"]:
            raise CaptureError("residuals were not captured: trace with what=(..., 'residuals').")
        n = self.meta["num_layers"]
        if isinstance(layer, int) and -n <= layer < 0:
            layer += n
        if f"residual.{layer}" not in self._t:
            raise CaptureError(f"layer {layer!r}: residuals were captured for layers {_short(self.meta['layers'])}.")
        return self._t[f"residual.{layer}"]

    def lens_logits(self, layer: int, model=None) -> torch.Tensor:
        """[tokens, vocab] float32: the model's final norm and lm_head applied to residual(layer)."""
        model = self._need_model(model)
        adapter = adapter_for(model.config)[0]
        norm = _get(model, adapter.layers.rsplit(".", 1)[0]).norm
        head = model.get_output_embeddings()
        x = self.residual(layer).to(head.weight.device, getattr(torch, self.meta["residual_dtype"]))
        with torch.no_grad():
            return head(norm(x)).float().cpu()

    def logit_lens(self, layer: int, k: int = 5, model=None, tokenizer=None) -> LogitLens:
        """Top-k next-token guesses read from residual(layer) through the final norm and lm_head."""
        probs = torch.softmax(self.lens_logits(layer, model), dim=-1)
        top = probs.topk(k, dim=-1)
        decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
        return LogitLens(top.indices, top.values, [[decode(int(i)) for i in row] for row in top.indices])

    def _need_model(self, model):
        model = model if model is not None else (self._model() if self._model else None)
        if model is None:
            raise CaptureError("this needs the model (a loaded trace keeps no weights): pass model=session.model.")
        self.check_model(model)
        return model

    def check_model(self, model) -> None:
        """Raise TraceModelMismatchError unless `model` has the config this trace was recorded from."""
        if config_hash(model.config) != self.meta["config_hash"]:
            raise TraceModelMismatchError(
                f"this trace was recorded from {self.meta.get('model')!r} (config {self.meta['config_hash'][:12]}), "
                f"not from this model ({getattr(model.config, '_name_or_path', '?')!r}, config "
                f"{config_hash(model.config)[:12]}): load the model it came from.")

    # ---- files ------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write one .wbtrace file: safetensors, with the metadata as JSON in its header."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = dict(self.meta, tokens=self.tokens.strings, channels=self.tokens.channels,
                    shapes={k: list(v.shape) for k, v in self._t.items()})
        tensors = {k: v.contiguous() for k, v in self._t.items()}
        tensors["tokens.ids"] = torch.tensor(self.tokens.ids, dtype=torch.int64)
        save_file(tensors, str(path), metadata={"workbench": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path, model=None) -> "Trace":
        """Read a .wbtrace file; with `model`, also check the trace came from it."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("workbench")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error type for garbage and truncation
            raise TraceFileError(f"{path} is not a readable .wbtrace file (not safetensors, or truncated): {e}") from e
        try:
            meta = json.loads(header)
        except (TypeError, ValueError) as e:
            raise TraceFileError(f"{path} is a safetensors file but not a workbench trace (no metadata).") from e
        if meta.get("format") != FORMAT:
            raise TraceFileError(f"{path} is not a workbench trace (format {meta.get('format')!r}).")
        if meta.get("version") != VERSION:
            raise TraceFileError(f"{path} is trace format version {meta.get('version')!r}; this workbench reads "
                                 f"version {VERSION}: upgrade the workbench or re-trace.")
        shapes = meta.pop("shapes", {})
        bad = [k for k, s in shapes.items() if k not in tensors or list(tensors[k].shape) != s]
        if bad or "tokens.ids" not in tensors:
            raise TraceFileError(f"{path} is incomplete: missing or misshapen tensors {bad or ['tokens.ids']}.")
        ids = tensors.pop("tokens.ids").tolist()
        tokens = Tokens(ids, meta.pop("tokens"), meta.pop("channels"))
        t = cls(tokens, meta, tensors)
        if model is not None:
            t.check_model(model)
        return t

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def from_record(cls, cap: Capture, record: Record, tokenizer=None, channels=None, preset=None) -> "Trace":
        import safetensors
        import transformers

        from workbench import __version__

        ids = record.input_ids.tolist() if record.input_ids is not None else []
        strings = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
        tensors: dict[str, torch.Tensor] = {}
        attention_layers = sorted(record.q)
        for layer in attention_layers:
            tensors[f"q.{layer}"], tensors[f"k.{layer}"] = record.q[layer], record.k[layer]
            if record.attn[layer]["sinks"] is not None:
                tensors[f"sinks.{layer}"] = record.attn[layer]["sinks"]
        routed = sorted(record.logits)
        if routed:
            tensors["routing.indices"] = torch.stack([record.indices[i] for i in routed])
            tensors["routing.weights"] = torch.stack([record.weights[i] for i in routed])
            tensors["routing.logits"] = torch.stack([record.logits[i] for i in routed])
        for layer, r in record.residuals.items():
            tensors[f"residual.{layer}"] = r
        if record.key_mask is not None:
            tensors["key_mask"] = record.key_mask
        meta = {
            "format": FORMAT, "version": VERSION,
            "model": getattr(cap.config, "_name_or_path", None) or None,
            "model_type": getattr(cap.config, "model_type", None), "family": cap.adapter.family,
            "config_hash": config_hash(cap.model.config), "preset": preset,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "versions": {"workbench": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "safetensors": safetensors.__version__},
            "what": list(cap.what), "layers": cap.layers, "attention_layers": attention_layers,
            "routing_layers": routed, "heads": cap.heads, "kv_heads": cap.kv_heads, "groups": cap.groups,
            "num_layers": len(cap.adapter.layer_list(cap.model)), "num_heads": cap.n_heads,
            "storage_dtype": str(cap.dtype).removeprefix("torch."),
            "model_dtype": str(cap.model_dtype).removeprefix("torch."),
            "residual_dtype": record.residual_dtype,
            "attention": {str(layer): {k: v for k, v in record.attn[layer].items() if k != "sinks"}
                          for layer in attention_layers},
        }
        if channels is not None and len(channels) != len(ids):
            channels = None
        return cls(Tokens(ids, strings, channels), meta, tensors, model=cap.model)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _short(xs: list[int]) -> str:
    if xs and xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 3:
        return f"{xs[0]}..{xs[-1]}"
    return str(xs)


# ---- the entry point --------------------------------------------------------------------------------
def as_token_ids(tokenizer, inputs) -> tuple[list[int], list[str] | None]:
    """Token ids (and channel labels) for a Generation, a raw string, chat messages, or token ids."""
    if hasattr(inputs, "prompt_ids") and hasattr(inputs, "token_ids"):
        ids = list(inputs.prompt_ids) + list(inputs.token_ids)
        channels = getattr(inputs, "token_channels", None)
        if channels is not None and len(channels) == len(inputs.token_ids):
            return ids, ["prompt"] * len(inputs.prompt_ids) + list(channels)
        return ids, None
    if isinstance(inputs, torch.Tensor):
        return inputs.reshape(-1).tolist(), None
    if isinstance(inputs, str):
        return list(tokenizer(inputs)["input_ids"]), None
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, int) for i in inputs):
        return list(inputs), None
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(m, dict) for m in inputs):
        from workbench.chat import harmony as chat

        return chat.render(tokenizer, inputs, add_generation_prompt=inputs[-1].get("role") != "assistant"), None
    raise CaptureError(f"trace() takes a Generation, a string, chat messages or token ids, not {type(inputs).__name__}.")


def trace(model, tokenizer, adapter: Adapter, inputs, what=None, layers=None, heads=None, budget="2GB",
          dtype: torch.dtype | None = None, preset: str | None = None) -> Trace:
    """One forward over `inputs` with capture; returns a Trace.

    what: any of "routing", "attention", "residuals" (default: routing and attention; attention on dense
    models). dtype: storage for q/k/residuals (default: the model's dtype if 16-bit, else float16;
    torch.float32 for exact work on a float32 model). budget: '2GB', '500MB', bytes or None.
    """
    ids, channels = as_token_ids(tokenizer, inputs)
    if not ids:
        raise CaptureError("nothing to trace: the input has no tokens.")
    device = getattr(model, "device", None) or next(model.parameters()).device
    cap = capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype)
    if budget is not None:
        cap.budget = budget
        check_budget(cap, len(ids))  # before any hook is installed
        cap.budget = None
    input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
    with torch.no_grad(), cap:
        model(input_ids=input_ids, use_cache=False)
    return Trace.from_record(cap, cap.records[-1], tokenizer, channels, preset=preset)
