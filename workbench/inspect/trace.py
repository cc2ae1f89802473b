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

Why one module of about 570 lines: the Trace and BatchTrace types, their typed accessors and their file format: kept
together so the on-disk format and what reads it change in one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import weakref
import zlib
from pathlib import Path

import torch

from workbench.errors import CaptureError, TraceFileError, TraceModelMismatchError
from workbench.indices import format_indices, resolve_index
from workbench.inspect.spec import CaptureSpec, Record, config_hash
from workbench.model.adapters import adapter_for

FORMAT, VERSION = "workbench-trace", 1
_QUERY_BLOCK = 256


# ---- the trace --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tokens:
    ids: list[int]
    strings: list[str]
    channels: list[str] | None = None  # per token, when traced from a Generation ("prompt" for the prompt)

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class LayerRouting:
    """What one routed layer applied to every token."""

    layer: int
    indices: torch.Tensor  # [tokens, k] int64
    weights: torch.Tensor  # [tokens, k]
    logits: torch.Tensor  # [tokens, experts] float32


@dataclasses.dataclass
class Routing:
    """Routing of the routed layers a trace recorded. The tensors' first axis runs over `layers` (rows);
    `at(layer)` addresses a model layer (negative counts from the last routed layer)."""

    layers: list[int]  # which model layers the rows are
    indices: torch.Tensor  # [layers, tokens, k] int64
    weights: torch.Tensor  # [layers, tokens, k], the weights the model applied (its dtype)
    logits: torch.Tensor  # [layers, tokens, experts] float32
    num_layers: int | None = None  # layers in the model, for messages

    def row(self, layer: int) -> int:
        """The row of model layer `layer` in the tensors above."""
        hint = f" (the model has layers 0..{self.num_layers - 1})" if self.num_layers else ""
        return self.layers.index(resolve_index(layer, self.layers, "layer", "this trace's routing (MoE layers)",
                                               CaptureError, hint, count=self.num_layers))

    def at(self, layer: int) -> LayerRouting:
        """Experts, weights and logits of model layer `layer`."""
        r = self.row(layer)
        return LayerRouting(self.layers[r], self.indices[r], self.weights[r], self.logits[r])


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
    """One captured layer's attention arithmetic, as the model ran it."""

    scaling: float
    window: int | None       # sliding window (None: full attention)
    softcap: float | None
    offset: int              # keys from a cache before the first query


@dataclasses.dataclass
class LogitLens:
    ids: torch.Tensor  # [tokens, k]
    probs: torch.Tensor  # [tokens, k] float32
    strings: list[list[str]]


class Trace:
    """Routing, attention (as q and k) and residuals of one forward pass over one sequence."""

    def __init__(self, tokens: Tokens, meta: dict, tensors: dict[str, torch.Tensor], model=None):
        self.tokens, self.meta, self._t = tokens, meta, tensors
        self._model = weakref.ref(model) if model is not None else None
        self._sink_mass = None
        r = meta.get("routing_layers") or []
        self.routing: Routing | None = Routing(
            r, tensors["routing.indices"], tensors["routing.weights"], tensors["routing.logits"],
            meta.get("num_layers")) if r else None

    @property
    def layers(self) -> list[int]:
        """The model layers this trace was asked for (each part's own: attention_layers, routing.layers)."""
        return self.meta["layers"]

    @property
    def attention_layers(self) -> list[int]:
        """Model layers whose attention was captured."""
        return self.meta["attention_layers"]

    @property
    def provenance(self) -> list[dict]:
        """What was active when this trace was taken (interventions, steering, hooks); [] for a clean run."""
        return self.meta.get("provenance") or []

    # ---- typed metadata: what views and tools read (the JSON dict `meta` is the file format) ----
    @property
    def what(self) -> list[str]:
        """The capture groups recorded ("routing", "attention", "residuals"); explicit points: `points`."""
        return list(self.meta["what"])

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.meta["num_heads"])

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return int(self.meta["groups"])

    @property
    def family(self) -> str | None:
        return self.meta.get("family")

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model")

    def attention_info(self, layer: int) -> AttentionInfo:
        """How layer `layer`'s attention was computed: scaling, sliding window, softcap, key offset."""
        info = self.meta["attention"][str(layer)]
        return AttentionInfo(scaling=info["scaling"], window=info["window"], softcap=info.get("softcap"),
                             offset=int(info.get("offset", 0)))

    @property
    def points(self) -> list[str]:
        """The hook points this trace can answer `t[name]` for (explicit ones and those its groups hold)."""
        out = list(self.meta.get("points") or [])
        for layer in self.meta.get("attention_layers", []):
            out += [f"blocks.{layer}.attn.{k}" for k in ("q", "k", "pattern")]
            if f"sinks.{layer}" in self._t:
                out.append(f"blocks.{layer}.attn.sink")
        for layer in self.meta.get("routing_layers") or []:
            out += [f"blocks.{layer}.mlp.router.{k}" for k in ("logits", "indices", "weights")]
        if "residuals" in self.meta["what"]:
            out += [f"blocks.{layer}.resid_post" for layer in self.meta["layers"]]
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        """The value recorded at a hook point, per sequence (README, 'Hook points', gives each shape):
        `t["blocks.3.resid_post"]`, `t["blocks.1.mlp.experts.2.act"]` (rows: t.positions(name)), `t["logits"]`."""
        if not isinstance(name, str):
            raise CaptureError(f"index a Trace with a hook point name such as 'blocks.0.resid_post', not {name!r}.")
        name = self._canonical(name)
        if f"point:{name}" in self._t:
            return self._t[f"point:{name}"]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m:
            layer, key = int(m.group(1)), m.group(2)
            if key == "resid_post" and f"residual.{layer}" in self._t:
                return self._t[f"residual.{layer}"]
            if key in ("attn.q", "attn.k") and f"{key[-1]}.{layer}" in self._t:
                return self._t[f"{key[-1]}.{layer}"]
            if key == "attn.pattern" and f"q.{layer}" in self._t:
                return self.attention(layer)
            if key == "attn.sink" and f"sinks.{layer}" in self._t:
                return self._t[f"sinks.{layer}"]
            if key.startswith("mlp.router.") and self.routing is not None and layer in self.routing.layers:
                at = self.routing.at(layer)
                return getattr(at, key.rsplit(".", 1)[1])
        near = difflib.get_close_matches(name, self.points, n=4, cutoff=0.5)
        raise CaptureError(f"{name!r} was not captured in this trace"
                           + (f" (near: {', '.join(near)})" if near else "")
                           + f". Trace with what=[{name!r}] to record it; this trace holds "
                           + (f"{len(self.points)} points, e.g. {', '.join(self.points[:4])}." if self.points
                              else "no hook points."))

    def positions(self, name: str) -> torch.Tensor:
        """Token positions of the rows of an expert point (`t.positions("blocks.1.mlp.experts.2.in")`)."""
        name = self._canonical(name)
        if f"positions:{name}" not in self._t:
            raise CaptureError(f"{name!r}: positions belong to expert points (blocks.L.mlp.experts.E.in/act/out) "
                               "captured in this trace.")
        return self._t[f"positions:{name}"]

    def _canonical(self, name: str) -> str:
        """Negative layers and experts counted from the end, as everywhere."""
        m = re.fullmatch(r"blocks\.(-?\d+)\.(.+)", name.strip())
        if not m:
            return name.strip()
        layer, rest = int(m.group(1)), m.group(2)
        if layer < 0:
            layer += self.meta["num_layers"]
        e = re.fullmatch(r"mlp\.experts\.(-?\d+)\.(in|act|out)", rest)
        if e and int(e.group(1)) < 0 and self.meta.get("num_experts"):
            rest = f"mlp.experts.{int(e.group(1)) + self.meta['num_experts']}.{e.group(2)}"
        return f"blocks.{layer}.{rest}"

    @property
    def model(self):
        """The model the trace was taken from, while it is alive (None for a trace loaded from a file)."""
        return self._model() if self._model is not None else None

    @property
    def heads(self) -> list[int]:
        return self.meta["heads"]

    def __repr__(self) -> str:
        changed = f", with {', '.join(p['name'] for p in self.provenance)}" if self.provenance else ""
        return (f"Trace({self.meta.get('model')!r}, {len(self.tokens)} tokens, {', '.join(self.meta['what'])}, "
                f"layers={format_indices(self.meta['layers'])}, heads={format_indices(self.heads)}{changed})")

    # ---- attention ------------------------------------------------------------------------------
    def attention_layer(self, layer: int) -> int:
        """`layer` as a captured attention layer (negative counts from the last one), else a CaptureError."""
        if "attention" not in self.meta["what"] or not self.attention_layers:
            raise CaptureError("this trace has no attention: trace with what=['attention'] (plus anything else).")
        n = self.meta["num_layers"]
        hint = (f" (the model has layers 0..{n - 1}: trace with layers=[...] to capture others)"
                if len(self.attention_layers) < n else "")
        return resolve_index(layer, self.attention_layers, "layer", "this trace's attention", CaptureError, hint,
                             count=n)

    def attention_head(self, head: int) -> int:
        """`head` as a captured head (negative counts from the last one), else a CaptureError."""
        n = self.meta["num_heads"]
        hint = f" (the model has heads 0..{n - 1})" if len(self.heads) < n else ""
        return resolve_index(head, self.heads, "head", "this trace's attention", CaptureError, hint, count=n)

    def _check(self, layer: int, head=None) -> tuple[int, list[int]]:
        layer = self.attention_layer(layer)
        return layer, self.heads if head is None else [self.attention_head(head)]

    def has_sinks(self, layer: int) -> bool:
        """Whether `layer` has learned attention sinks (gpt-oss): the trace keeps their logits beside q and k."""
        return f"sinks.{self.attention_layer(layer)}" in self._t

    def attention_blocks(self, layer: int, heads: list[int] | None = None):
        """Yield (query start, key start, probs [heads, queries, keys], sink [heads, queries] or None) for `heads`
        (default all) of `layer`, one block of queries at a time: memory stays one block, even for 2,000 tokens
        x 64 heads. On a sliding-window layer a block holds only the keys its queries can see (from key start)."""
        layer = self.attention_layer(layer)
        heads = self.heads if heads is None else [self.attention_head(h) for h in heads]
        for a, _, lo, probs, sink in self._blocks(layer, heads):
            yield a, lo, probs, sink

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
        """[attention layers, heads, tokens] float32: each query's probability taken by the sink (0 without).
        Rows run over `attention_layers`; `sink_mass_at(layer)` addresses a model layer."""
        if self._sink_mass is None:
            self._sink_mass = torch.stack([self._layer_sink_mass(layer, self.heads) for layer in self.attention_layers]) \
                if self.attention_layers else torch.zeros(0, len(self.heads), len(self.tokens))
        return self._sink_mass

    def sink_mass_at(self, layer: int, head: int | None = None) -> torch.Tensor:
        """Sink mass of model layer `layer`: [heads, tokens], or [tokens] for one head. Computes only that
        layer (and head) unless `sink_mass` was computed already."""
        layer, heads = self._check(layer, head)
        if self._sink_mass is not None:
            mass = self._sink_mass[self.attention_layers.index(layer)]
            return mass[self.heads.index(heads[0])] if head is not None else mass
        mass = self._layer_sink_mass(layer, heads)
        return mass[0] if head is not None else mass

    def _layer_sink_mass(self, layer: int, heads: list[int]) -> torch.Tensor:
        mass = torch.zeros(len(heads), len(self.tokens))
        if f"sinks.{layer}" in self._t:
            for a, b, _, _, sink in self._blocks(layer, heads):
                mass[:, a:b] = sink
        return mass

    # ---- residuals and logit lens ---------------------------------------------------------------------
    def residual(self, layer: int) -> torch.Tensor:
        """[tokens, hidden]: the residual stream after decoder layer `layer`, t[f"blocks.{layer}.resid_post"], recorded
        by that point or by the group "residuals"."""
        if "residuals" in self.meta["what"]:
            layers = self.meta["layers"]
            if isinstance(layer, int) and not isinstance(layer, bool) and \
                    f"point:blocks.{layer % max(self.meta['num_layers'], 1)}.resid_post" in self._t:
                return self[f"blocks.{layer}.resid_post"]
            layer = resolve_index(layer, layers, "layer", "this trace's residuals", CaptureError,
                                  count=self.meta["num_layers"])
            return self._t[f"residual.{layer}"]
        try:
            return self[f"blocks.{layer}.resid_post"]
        except CaptureError:
            raise CaptureError(f"the residual stream after layer {layer} was not captured: trace with "
                               f"what=['blocks.{layer}.resid_post'] (or the group 'residuals').") from None

    def lens_logits(self, layer: int, model=None, positions: range | None = None) -> torch.Tensor:
        """[tokens, vocab] float32: the model's final norm and lm_head applied to residual(layer), for
        `positions` only when given (the unembedding of a long trace is tokens x vocab floats per layer)."""
        model = self.require_model(model)
        norm = adapter_for(model.config)[0].final_norm_module(model)
        head = model.get_output_embeddings()
        x = self.residual(layer)
        if positions is not None:
            x = x[positions.start:positions.stop]
        x = x.to(head.weight.device, getattr(torch, self.meta["residual_dtype"]))
        with torch.no_grad():
            return head(norm(x)).float().cpu()

    def logit_lens(self, layer: int, k: int = 5, model=None, tokenizer=None,
                   positions: range | None = None) -> LogitLens:
        """Top-k next-token guesses read from residual(layer) through the final norm and lm_head."""
        probs = torch.softmax(self.lens_logits(layer, model, positions), dim=-1)
        top = probs.topk(k, dim=-1)
        decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
        return LogitLens(top.indices, top.values, [[decode(int(i)) for i in row] for row in top.indices])

    def features(self, sae, k: int = 5):
        """Top-k active features of a sparse autoencoder at every token: `sae.features(self, k)` (the SAE lives in
        workbench/analysis/sae.py, a layer above this one, so it is duck-typed here, never imported)."""
        return sae.features(self, k)

    def require_model(self, model=None):
        """`model` (checked to be the one this trace came from), else the live model it was taken from."""
        model = model if model is not None else self.model
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
        """Write one .wbtrace file: safetensors, with the metadata as JSON in its header, including a CRC-32 of every
        tensor's bytes, which `load` verifies."""
        from safetensors.torch import save_file

        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise TraceFileError(f"{path} is a folder: give a file name, e.g. {path / 'run.wbtrace'}.")
        if not folder.is_dir():
            raise TraceFileError(f"cannot save the trace to {path}: the folder {folder} does not exist (create it "
                                 f"first: os.makedirs({str(folder)!r})).")
        if not os.access(folder, os.W_OK):
            raise TraceFileError(f"cannot save the trace to {path}: the folder {folder} is not writable; choose "
                                 "another folder.")
        tensors = {k: v.contiguous() for k, v in self._t.items()}
        tensors["tokens.ids"] = torch.tensor(self.tokens.ids, dtype=torch.int64)
        meta = dict(self.meta, tokens=self.tokens.strings, channels=self.tokens.channels,
                    shapes={k: list(v.shape) for k, v in self._t.items()},
                    crc32={k: _crc32(v) for k, v in tensors.items()})
        try:
            save_file(tensors, str(path), metadata={"workbench": json.dumps(meta)})
        except Exception as e:  # safetensors names only its hidden temporary file
            raise TraceFileError(f"cannot save the trace to {path}: {e}") from e
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
        _verify_checksums(path, tensors, meta.pop("crc32", None))
        ids = tensors.pop("tokens.ids").tolist()
        tokens = Tokens(ids, meta.pop("tokens"), meta.pop("channels"))
        t = cls(tokens, meta, tensors)
        if model is not None:
            t.check_model(model)
        return t

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def from_record(cls, spec: CaptureSpec, record: Record, tokenizer=None, channels=None, preset=None,
                    model=None, provenance: list[dict] | None = None) -> "Trace":
        """A Trace from what a capture asked for (`spec`) and what one forward recorded."""
        import safetensors
        import transformers

        from workbench.version import __version__

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
        for point in spec.resolved_points():
            x = record.points.get(point.name)
            if point.expert is not None:
                width = spec.expert_width if point.stage == "act" else spec.hidden_size
                if x is None:  # no token was routed to this expert
                    x = torch.empty(0, width, dtype=spec.value_dtype or spec.model_dtype)
                tensors[f"positions:{point.name}"] = record.positions.get(point.name, torch.empty(0, dtype=torch.int64))
            if x is not None:
                tensors[f"point:{point.name}"] = x
        meta = {
            "format": FORMAT, "version": VERSION,
            "model": spec.model_name, "model_type": spec.model_type, "family": spec.family,
            "config_hash": spec.config_hash, "preset": preset,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "versions": {"workbench": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "safetensors": safetensors.__version__},
            "what": list(spec.what), "points": list(spec.points), "layers": spec.layers, "attention_layers": attention_layers,
            "routing_layers": routed, "heads": spec.heads, "kv_heads": spec.kv_heads, "groups": spec.groups,
            "num_layers": spec.num_layers, "num_heads": spec.num_heads, "num_experts": spec.num_experts,
            "storage_dtype": str(spec.storage_dtype).removeprefix("torch."),
            "model_dtype": str(spec.model_dtype).removeprefix("torch."),
            "residual_dtype": record.residual_dtype,
            "provenance": list(provenance or []),
            "attention": {str(layer): {k: v for k, v in record.attn[layer].items() if k != "sinks"}
                          for layer in attention_layers},
        }
        if channels is not None and len(channels) != len(ids):
            channels = None
        return cls(Tokens(ids, strings, channels), meta, tensors, model=model)


def _crc32(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes, as 8 hex digits. A checksum against damage (a bad copy or disk), not tampering:
    CRC-32 catches every burst of up to 32 flipped bits and measured 2x faster than sha256 here."""
    return f"{zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()):08x}"


def _verify_checksums(path: Path, tensors: dict[str, torch.Tensor], checksums: dict | None) -> None:
    """TraceFileError naming the tensors whose bytes differ from the CRC-32 written at save. Traces saved before
    checksums were written (same format version) have none and load unverified."""
    if checksums is None:
        return
    bad = [k for k, t in tensors.items() if checksums.get(k) != _crc32(t)]
    if bad:
        named = ", ".join(f"{k!r} ({tensors[k].dtype}, {list(tensors[k].shape)})" for k in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise TraceFileError(
            f"{path} is damaged: tensor{'s' * (len(bad) > 1)} {named}{more} no longer match{'es' * (len(bad) == 1)} "
            "the checksum written when the trace was saved (the file changed since: a broken copy, download or disk). "
            "Copy it again from where it was saved, or re-trace.")


class BatchTrace:
    """Traces of several inputs taken in one padded forward: `t[i]` is row i's Trace, equal to tracing that
    input alone (no padding in it), `len(t)` rows, iterable."""

    def __init__(self, rows: list[Trace]):
        self.rows = list(rows)

    def __getitem__(self, i: int) -> Trace:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def provenance(self) -> list[dict]:
        return self.rows[0].provenance if self.rows else []

    def __repr__(self) -> str:
        lengths = ", ".join(str(len(t.tokens)) for t in self.rows[:8]) + (", ..." if len(self.rows) > 8 else "")
        return f"BatchTrace({len(self.rows)} rows of {lengths} tokens)"


