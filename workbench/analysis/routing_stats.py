"""Routing statistics over a corpus, streamed: memory stays flat however many texts go through.

    st = routing_stats(s, texts, batch_size=8, max_tokens=512, checkpoint="stats.safetensors")
    st.expert_load     # [layers, experts] int64: top-k selections per expert
    st.load_weight     # [layers, experts] float64: summed routing weights the model applied
    st.coactivation    # [layers, experts, experts] int64: tokens that chose both (diagonal = load)
    st.entropy_mean    # [layers] bits; st.entropy_hist [layers, bins] over [0, log2(experts)]
    st.top_tokens(layer, expert, k=10)   # token ids sent there most, from st.token_experts
    st.save("stats.safetensors"); RoutingStats.load("stats.safetensors")
    merge_routing_stats(["a.safetensors", "b.safetensors"])   # parts from several processes, summed

- texts: any iterable, consumed lazily: strings, dicts with a "text" key (HF datasets rows), or token-id
  lists. Each is tokenized like `s.trace(text)` and truncated to its first `max_tokens` tokens.
- Batches are padded on the RIGHT: real tokens keep positions 0..n-1 and causal attention never sees the
  pads, so every counted token is routed bit for bit as in a one-text trace (left padding shifts positions
  and changes the numbers). Pad positions are dropped before anything is counted.
- Routing is read as the capture reads it (workbench/capture.py): a pre-hook on each routed MLP recomputes
  the router logits from the MLP input with F.linear, applies active interventions' logit transforms, and
  `adapter.route` gives experts and weights. Entropy is of softmax over all router logits, in bits.
- Token -> expert table: for every token id seen, top-k selection counts per layer and expert (int32),
  one row per distinct id, so it grows with the vocabulary seen, never with the corpus: at worst
  vocab x layers x experts x 4 bytes (gpt-oss-20b: 201,088 x 24 x 32 x 4 = 618 MB; `token_table=False` skips it).
- Checkpoints: safetensors + JSON metadata, written to a temp file then os.replace'd, every
  `checkpoint_every` batches, at the end, and on an exception between batches. Calling again with the
  same checkpoint skips the texts already counted; one from another model raises.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch

from workbench.chat import inputs as input_rule
from workbench.errors import RoutingStatsError, TraceModelMismatchError
from workbench.inspect.capture import pad_right  # the one batching, shared with batched traces
from workbench.inspect.routing import Routed, watch_routing
from workbench.inspect.spec import config_hash
from workbench.metrics import entropy_bits, entropy_bits_from_logits
from workbench.model.adapters import input_device, text_config

FORMAT, VERSION = "workbench-routing-stats", 2  # 2: load/load_weight renamed expert_load/expert_load_weight
BINS = 20
_COUNTS = ("expert_load", "expert_load_weight", "top1", "coactivation", "entropy_sum", "entropy_hist")


class RoutingStatsMismatchError(RoutingStatsError, TraceModelMismatchError):
    """A checkpoint or part recorded from another model, or with other settings."""


@dataclasses.dataclass(eq=False)
class RoutingStats:
    layers: list[int]  # model layers the rows are
    num_experts: int
    top_k: int
    meta: dict  # config_hash, model, max_tokens, bins, token_table
    texts: int = 0  # texts consumed (empty ones included)
    tokens: int = 0  # tokens counted (pads excluded), the same in every layer
    expert_load: torch.Tensor = None  # [L, E] int64: top-k selections per expert
    expert_load_weight: torch.Tensor = None  # [L, E] float64: applied weights summed
    top1: torch.Tensor = None  # [L, E] int64: first choices only
    coactivation: torch.Tensor = None  # [L, E, E] int64
    entropy_sum: torch.Tensor = None  # [L] float64, bits
    entropy_hist: torch.Tensor = None  # [L, bins] int64
    token_ids: torch.Tensor = None  # [n seen] int64
    token_experts: torch.Tensor = None  # [n seen, L, E] int32: a view of _table's first rows
    _rows: dict = dataclasses.field(default=None, repr=False)  # token id -> row
    _table: torch.Tensor = dataclasses.field(default=None, repr=False)  # rows with spare capacity

    @classmethod
    def empty(cls, layers, num_experts, top_k, meta, device="cpu") -> "RoutingStats":
        L, E, bins = len(layers), num_experts, meta["bins"]
        z = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(list(layers), E, top_k, dict(meta), 0, 0, z(L, E), z(L, E, dtype=torch.float64), z(L, E),
                   z(L, E, E), z(L, dtype=torch.float64), z(L, bins), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, L, E, dtype=torch.int32))

    # ---- reading -------------------------------------------------------------------------------------
    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise RoutingStatsError(f"layer {layer} is not routed here: routed layers are {self.layers}.")
        return self.layers.index(layer)

    @property
    def entropy_mean(self) -> torch.Tensor:
        """[L] mean router entropy in bits (max log2(experts))."""
        return self.entropy_sum / max(self.tokens, 1)

    @property
    def entropy_edges(self) -> torch.Tensor:
        return torch.linspace(0, math.log2(self.num_experts), self.meta["bins"] + 1, dtype=torch.float64)

    def load_share(self) -> torch.Tensor:
        """[L, E] share of tokens that chose each expert (rows sum to top_k)."""
        return self.expert_load.double() / max(self.tokens, 1)

    def load_balance(self) -> dict[str, torch.Tensor]:
        """Per layer ([L] each): coefficient of variation of the load, max/mean, min/mean, and the
        normalized entropy of the load distribution (1.0 = perfectly balanced)."""
        load = self.expert_load.double()
        mean = load.mean(1).clamp_min(1e-12)
        p = load / load.sum(1, keepdim=True).clamp_min(1e-12)
        return {"cv": load.std(1, unbiased=False) / mean, "max_over_mean": load.amax(1) / mean,
                "min_over_mean": load.amin(1) / mean,
                "normalized_entropy": entropy_bits(p, dim=1) / math.log2(self.num_experts)}

    def top_tokens(self, layer: int, expert: int, k: int = 10, tokenizer=None) -> list[tuple]:
        """The k token ids sent to `expert` at `layer` most often: (id, text or None, count, share), where
        share is the fraction of that token's occurrences that went there."""
        if self.token_experts.numel() == 0 and not self.meta.get("token_table", True):
            raise RoutingStatsError("computed with token_table=False: no token -> expert table.")
        counts = self.token_experts[:, self.row(layer)].long()  # [n, E]
        column = counts[:, expert]
        order = torch.argsort(column, descending=True, stable=True)[:k]
        out = []
        for i in order.tolist():
            if column[i] == 0:
                break
            tid = int(self.token_ids[i])
            text = tokenizer.decode([tid]) if tokenizer is not None else None
            out.append((tid, text, int(column[i]), float(column[i] / (counts[i].sum() / self.top_k))))
        return out

    def __repr__(self) -> str:
        bal = self.load_balance()["max_over_mean"]
        return (f"RoutingStats({self.texts} texts, {self.tokens} tokens, layers {self.layers}, {self.num_experts} "
                f"experts, top-{self.top_k}; mean entropy {self.entropy_mean.mean():.2f} bits; busiest expert "
                f"max/mean load {bal.max():.2f}; {len(self.token_ids)} distinct tokens)")

    # ---- accumulating ----------------------------------------------------------------------------------
    def _add(self, indices: torch.Tensor, weights: torch.Tensor, entropy: torch.Tensor, ids: torch.Tensor):
        """Count one batch: indices/weights [L, N, k], entropy [L, N] (bits), ids [N]; pads already dropped."""
        L, N, k = indices.shape
        E, bins = self.num_experts, self.meta["bins"]
        offset = (torch.arange(L, device=indices.device) * E).view(L, 1, 1)
        flat = (indices + offset).reshape(-1)
        self.expert_load += torch.bincount(flat, minlength=L * E).view(L, E)
        self.expert_load_weight.view(-1).index_add_(0, flat, weights.reshape(-1).double())
        self.top1 += torch.bincount((indices[..., 0:1] + offset).reshape(-1), minlength=L * E).view(L, E)
        pairs = (indices + offset).unsqueeze(-1) * E + indices.unsqueeze(-2)  # [L, N, k, k]
        self.coactivation += torch.bincount(pairs.reshape(-1), minlength=L * E * E).view(L, E, E)
        self.entropy_sum += entropy.double().sum(1)
        b = (entropy / math.log2(E) * bins).floor().long().clamp_(0, bins - 1)
        hist_offset = (torch.arange(L, device=b.device) * bins).view(L, 1)
        self.entropy_hist += torch.bincount((b + hist_offset).reshape(-1), minlength=L * bins).view(L, bins)
        self.tokens += N
        if self.meta.get("token_table", True):
            self._add_tokens(ids.cpu(), indices.cpu())

    def _add_tokens(self, ids: torch.Tensor, indices: torch.Tensor) -> None:
        L, E = len(self.layers), self.num_experts
        rows = self._rows_for(ids.tolist())
        flat = (rows.view(1, -1, 1) * L + torch.arange(L).view(L, 1, 1)) * E + indices  # [L, N, k]
        self._table.view(-1).index_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.int32))

    def _rows_for(self, ids: list[int]) -> torch.Tensor:
        """Row of each token id in the table, appending rows (first-seen order) for new ids."""
        if self._rows is None:
            self._rows = dict(zip(self.token_ids.tolist(), itertools.count()))
            self._table = self.token_experts.contiguous()
        n = len(self._rows)
        new = [t for t in dict.fromkeys(ids) if t not in self._rows]
        if new:
            self._rows.update(zip(new, itertools.count(n)))
            if len(self._rows) > len(self._table):  # grow by doubling: amortised copies, no per-batch cat
                bigger = torch.zeros(max(2 * len(self._table), len(self._rows), 256), *self._table.shape[1:],
                                     dtype=torch.int32)
                bigger[:n] = self._table[:n]
                self._table = bigger
            self.token_ids = torch.cat([self.token_ids, torch.tensor(new, dtype=torch.int64)])
        self.token_experts = self._table[:len(self._rows)]
        return torch.tensor([self._rows[t] for t in ids], dtype=torch.int64)

    def _merge(self, other: "RoutingStats") -> None:
        for name in _COUNTS:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        self.texts += other.texts
        self.tokens += other.tokens
        if len(other.token_ids):
            rows = self._rows_for(other.token_ids.tolist())
            self._table.index_add_(0, rows, other.token_experts.to(torch.int32))

    # ---- files -----------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Atomically write safetensors + JSON metadata (temp file in the same folder, then os.replace)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous()
                   for name in _COUNTS + ("token_ids", "token_experts")}
        meta = dict(self.meta, format=FORMAT, version=VERSION, layers=self.layers, num_experts=self.num_experts,
                    top_k=self.top_k, texts=self.texts, tokens=self.tokens)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"workbench": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path) -> "RoutingStats":
        """Read a file written by `save` (or a routing_stats checkpoint)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("workbench", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for garbage and truncation
            raise RoutingStatsError(f"{path} is not a readable routing-stats file: {e}") from e
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise RoutingStatsError(f"{path} is not a routing-stats file of version {VERSION} ({meta.get('format')!r}, "
                                    f"version {meta.get('version')!r}).")
        fields = {k: meta.pop(k) for k in ("layers", "num_experts", "top_k", "texts", "tokens")}
        meta.pop("format"), meta.pop("version")
        return cls(meta=meta, **fields, **tensors)

    def to(self, device) -> "RoutingStats":
        """The counts on `device` (the token table stays on the CPU), in place."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def check_compatible(self, other: "RoutingStats", what: str) -> None:
        """Raise RoutingStatsMismatchError unless `other` counts the same model with the same settings."""
        if other.meta["config_hash"] != self.meta["config_hash"]:
            raise RoutingStatsMismatchError(
                f"{what} was computed on model {other.meta.get('model')!r} (config {other.meta['config_hash'][:12]}), "
                f"not on this model ({self.meta.get('model')!r}, config {self.meta['config_hash'][:12]}): "
                "use another checkpoint path, or load the model it came from.")
        for key in ("max_tokens", "bins", "token_table"):
            if other.meta.get(key) != self.meta.get(key):
                raise RoutingStatsMismatchError(f"{what} was computed with {key}={other.meta.get(key)!r}, "
                                                f"this run uses {key}={self.meta.get(key)!r}.")
        if (other.layers, other.num_experts, other.top_k) != (self.layers, self.num_experts, self.top_k):
            raise RoutingStatsMismatchError(f"{what} has other routed layers or experts than this run.")




# ---- reading routing during a batched forward ---------------------------------------------------------
class _RouterHooks:
    """Experts, weights and entropy of the non-pad rows of each batched forward, read through the
    router-logits primitive (workbench/inspect/routing.py), as the capture reads them."""

    def __init__(self, model, adapter, layers):
        self.watch = watch_routing(model, adapter, layers, self._on_route)
        self.layers, self.out, self.valid, self._masks = layers, {}, None, {}

    def __enter__(self) -> "_RouterHooks":
        self.watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.watch.__exit__(*exc)

    def _on_route(self, layer: int, routed: Routed) -> None:
        if self.valid is None:
            return
        keep = self._mask(routed.logits.device)
        entropy = entropy_bits_from_logits(routed.logits[keep])
        self.out[layer] = (routed.indices[keep], routed.weights[keep], entropy)

    def _mask(self, device) -> torch.Tensor:
        if device not in self._masks:  # layers may sit on different devices (device_map="auto")
            self._masks[device] = self.valid.to(device)
        return self._masks[device]

    def start(self, valid: torch.Tensor) -> None:
        self.valid, self._masks, self.out = valid, {}, {}

    def finish(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in self.out]
        self.valid = None
        if missing:
            raise RoutingStatsError(f"routing was not seen at layers {missing}: this MLP class is not supported.")
        return tuple(torch.stack([self.out[layer][i].to(device) for layer in self.layers]) for i in range(3))


def token_ids(tokenizer, item, text_key: str = "text") -> list[int]:
    """A corpus item as token ids: a row dict's `text_key`, else anything the input rule takes (a string is raw
    text, tokenized like `s.trace(text)`; wb.user(...) a chat turn; ids as they are)."""
    if isinstance(item, dict) and "role" not in item:
        if text_key not in item:
            raise RoutingStatsError(f"a corpus row has no {text_key!r} field (its keys: {', '.join(map(str, item))}): "
                                    "pass text_key= to name the text field.")
        item = item[text_key]
    if isinstance(item, str) and not item:
        return []  # an empty text in a corpus adds no tokens
    return input_rule.token_ids(tokenizer, item, error=RoutingStatsError, where="a corpus item")[0]


def forward_kwargs(model) -> dict:
    """Skip the vocabulary projection of all but the last position: counts need none of it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def routing_stats(session, texts: Iterable, *, batch_size: int = 8, max_tokens: int = 512, checkpoint=None,
                  checkpoint_every: int = 20, progress: bool = True, text_key: str = "text",
                  token_table: bool = True, bins: int = BINS) -> RoutingStats:
    """Routing aggregates over a corpus, streamed in right-padded batches (see the module docstring).

    checkpoint: a .safetensors path saved every `checkpoint_every` batches and at the end; if it exists,
    its texts are skipped (pass the same corpus in the same order) and counting goes on from there.
    """
    import contextlib

    from tqdm.auto import tqdm

    model, tokenizer, adapter = session.model, session.tokenizer, session.adapter
    if not adapter.is_moe:
        raise RoutingStatsError(f"this is a dense model (family {adapter.family!r}, no router): it has no routing "
                                "to count.")
    if batch_size < 1 or max_tokens < 1:
        raise RoutingStatsError("batch_size and max_tokens must be at least 1.")
    config = text_config(model.config)
    layers = adapter.moe_layers(model)
    device = input_device(model)
    meta = {"config_hash": config_hash(model.config), "model": getattr(config, "_name_or_path", None),
            "max_tokens": max_tokens, "bins": bins, "token_table": bool(token_table)}
    stats = RoutingStats.empty(layers, adapter.num_experts(config), adapter.top_k(config), meta, device)
    if checkpoint is not None and Path(checkpoint).exists():
        saved = RoutingStats.load(checkpoint)
        stats.check_compatible(saved, f"checkpoint {checkpoint}")
        stats = saved.to(device)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    extra = forward_kwargs(model)
    total = len(texts) if hasattr(texts, "__len__") else None
    items = itertools.islice(iter(texts), stats.texts, None)  # skip what the checkpoint already counted
    exclusive = session.exclusive("counting routing") if hasattr(session, "exclusive") else contextlib.nullcontext()
    consistent, batches = True, 0
    with exclusive, _RouterHooks(model, adapter, layers) as hooks, \
            tqdm(total=total, initial=stats.texts, unit="text", disable=not progress, desc="routing stats") as bar:
        try:
            while batch := list(itertools.islice(items, batch_size)):
                ids = [x[:max_tokens] for x in (token_ids(tokenizer, item, text_key) for item in batch)]
                kept = [x for x in ids if x]
                if kept:
                    input_ids, mask = pad_right(kept, pad_id, device)
                    valid = mask.reshape(-1).bool()
                    hooks.start(valid)
                    with torch.no_grad():
                        model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra)
                    routed = hooks.finish(stats.expert_load.device)
                consistent = False  # a failure from here to the end of the batch would leave half a batch
                if kept:
                    stats._add(*routed, input_ids.reshape(-1)[valid])
                stats.texts += len(batch)
                consistent, batches = True, batches + 1
                bar.update(len(batch))
                bar.set_postfix(tokens=stats.tokens, refresh=False)
                if checkpoint is not None and batches % checkpoint_every == 0:
                    stats.save(checkpoint)
        except BaseException:
            if checkpoint is not None and consistent:
                stats.save(checkpoint)  # between batches: resuming loses nothing
            raise
    if checkpoint is not None:
        stats.save(checkpoint)
    return stats


def merge_routing_stats(parts) -> RoutingStats:
    """Sum routing statistics (paths or RoutingStats) computed on disjoint parts of a corpus, e.g. one per
    process; all parts must come from the same model and settings."""
    parts = [p if isinstance(p, RoutingStats) else RoutingStats.load(p) for p in parts]
    if not parts:
        raise RoutingStatsError("nothing to merge: pass at least one routing-stats file or object.")
    first = parts[0]
    out = RoutingStats.empty(first.layers, first.num_experts, first.top_k, first.meta)
    for i, part in enumerate(parts):
        out.check_compatible(part, f"part {i}")
        out._merge(part)
    return out
