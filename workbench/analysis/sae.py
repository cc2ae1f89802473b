"""Sparse autoencoders on the residual stream: load, encode, decode, read features off a trace, steer.

    sae = wb.load_sae("workbench/fixtures/sae/smollm2-l15-topk")   # a folder in SAELens's format
    t = s.trace(text, what=["residuals"], layers=[sae.layer])
    t.features(sae)                     # top active features per token (also sae.features(t))
    f = sae.encode(t.residual(sae.layer)); x_hat = sae.decode(f)
    with s.steer_feature(sae, feature=42, amount=8.0):   # adds 8 * W_dec[42] to that layer's output
        g = s.chat("...")

Formats read:
- SAELens (`cfg.json` + `sae_weights.safetensors`: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
  `threshold` for JumpReLU). Architectures "standard" (ReLU), "topk" (per-token top-k, `k`,
  `rescale_acts_by_decoder_norm`), "jumprelu" (`threshold`), and "batchtopk" training checkpoints (their
  `topk_threshold` becomes a JumpReLU threshold, as SAELens does when it saves one for inference), plus the
  pre-6.0 spellings (`hook_point`, `activation_fn_str`/`activation_fn="topk"` with `activation_fn_kwargs.k`).
- dictionary_learning (`config.json` with a "trainer" entry + `ae.pt`), the format of the published gpt-oss-20b
  SAEs (andyrdt/saes-gpt-oss-20b, `resid_post_layer_{3,7,...,23}/trainer_N`), mapped as SAELens's
  `dictionary_learning_1` loader maps it: BatchTopKSAE -> JumpReLU with its scalar threshold on every
  feature, AutoEncoderTopK -> TopK, hook `blocks.{trainer.layer}.hook_resid_post`. `ae.pt` is read with
  `torch.load(weights_only=True)` (tensors only, no code runs).

The encode arithmetic is SAELens's (sae-lens 6.54.12, read from its source): x - b_dec (when
apply_b_dec_to_input), pre = x @ W_enc + b_enc, then ReLU; TopK: the k largest pre-activations (scaled by
||W_dec[f]|| first when rescale_acts_by_decoder_norm), ReLU'd, the rest 0; JumpReLU: ReLU(pre) where
pre > threshold, else 0. decode: f @ W_dec + b_dec (f / ||W_dec[f]|| first when rescaled).

Hook points: an SAE reads the residual stream after a decoder layer, the tensor `t.residual(layer)` returns
and `steer` adds to. Names mapped to that layer: `blocks.L.hook_resid_post` and `model.layers.L` (L),
`blocks.L.hook_resid_pre` (L - 1: the same tensor, one layer earlier), `resid_post_layer_L` (andyrdt's
folder names). Anything else (attention or MLP outputs, hook_z) raises SAEError; `load_sae(folder, layer=L)`
names the layer by hand.

Why one module of about 420 lines: one SAE type with the four file formats it loads from (SAELens, andyrdt's
dictionary_learning, the workbench's own, a state dict) and what it does on a trace (encode, decode, steer): a format
lives next to the fields it fills.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import torch

from workbench.errors import CaptureError, SAEError
from workbench.indices import as_integer
from workbench.intervene.steering import steer
from workbench.model.adapters import adapter_for, text_config

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
DICTIONARY_LEARNING_CFG, DICTIONARY_LEARNING_WEIGHTS = "config.json", "ae.pt"
ARCHITECTURES = ("standard", "topk", "jumprelu")
# SAEs shipped with the package, by model (scripts/train_sae.py; data, steps and figures in each NOTES.md).
FIXTURES = {"nano": Path(__file__).resolve().parent.parent / "fixtures" / "sae" / "nano-l1-topk16"}
_ENCODE_CHUNK = 256  # tokens encoded at once: [chunk, d_sae] floats, not [tokens, d_sae]

# (pattern, offset): the decoder layer whose output a hook name reads is int(group 1) + offset.
HOOKS = (
    (r"blocks\.(\d+)\.resid_post", 0),  # the workbench's hook point names (workbench/inspect/points.py)
    (r"blocks\.(\d+)\.resid_pre", -1),
    (r"blocks\.(\d+)\.hook_resid_post", 0),
    (r"blocks\.(\d+)\.hook_resid_pre", -1),
    (r"(?:model\.)?layers\.(\d+)(?:\.output)?", 0),
    (r"resid_post_layer_(\d+)(?:/.*)?", 0),
)


def hook_layer(hook_name: str) -> int:
    """The decoder layer whose output (residual stream) `hook_name` names; SAEError for other hook points."""
    for pattern, offset in HOOKS:
        m = re.fullmatch(pattern, hook_name or "")
        if m:
            layer = int(m.group(1)) + offset
            if layer < 0:
                raise SAEError(f"hook {hook_name!r} reads the embeddings (the residual before layer 0), which "
                               "traces do not record: SAEs on a decoder layer's output are supported.")
            return layer
    raise SAEError(f"hook {hook_name!r} is not a residual-stream hook the workbench maps to a layer (supported: "
                   "blocks.L.resid_post, blocks.L.resid_pre, blocks.L.hook_resid_post, blocks.L.hook_resid_pre, model.layers.L, "
                   "resid_post_layer_L); "
                   "if it is a decoder layer's output, load it with load_sae(folder, layer=L).")


@dataclasses.dataclass(eq=False)  # tensors: compare SAEs by identity
class SAE:
    """A sparse autoencoder on the residual stream after decoder layer `layer`."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str  # "standard", "topk" or "jumprelu"
    layer: int
    hook_name: str
    k: int | None = None  # topk
    threshold: torch.Tensor | None = None  # jumprelu, [d_sae]
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False
    metadata: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}.")
        if self.W_enc.dim() != 2:
            raise SAEError(f"W_enc must be a matrix [d_in, d_sae], not shape {tuple(self.W_enc.shape)}.")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc, (d_sae,)), "W_dec": (self.W_dec, (d_sae, d_in)), "b_dec": (self.b_dec, (d_in,))}
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise SAEError("a JumpReLU SAE needs its `threshold` tensor; the weights file has none.")
            shapes["threshold"] = (self.threshold, (d_sae,))
        bad = [f"{name} {tuple(t.shape)} (expected {shape})" for name, (t, shape) in shapes.items()
               if tuple(t.shape) != shape]
        if bad:
            raise SAEError(f"SAE weights do not fit together with W_enc [{d_in}, {d_sae}]: {', '.join(bad)}.")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise SAEError(f"a TopK SAE needs k between 1 and d_sae={d_sae}; its config says k={self.k!r}.")

    @property
    def point(self) -> str:
        """The workbench hook point it reads, `blocks.{layer}.resid_post`: `t[sae.point]` of a trace of that point."""
        return f"blocks.{self.layer}.resid_post"

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.architecture == "topk" else ""
        where = f" from {self.path}" if self.path else ""
        return (f"SAE({self.architecture}{k}, d_in={self.d_in}, d_sae={self.d_sae}, layer={self.layer} "
                f"({self.hook_name}){where})")

    # ---- the arithmetic (SAELens's) ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] for residuals x [..., d_in] (computed in the SAE's dtype)."""
        self._check_width(x)
        x = x.to(self.W_enc.device, self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstructed residuals [..., d_in] from feature activations f [..., d_sae]."""
        if f.shape[-1] != self.d_sae:
            raise SAEError(f"decode takes feature activations with d_sae={self.d_sae} in the last dimension, not "
                           f"shape {tuple(f.shape)}.")
        f = f.to(self.W_dec.device, self.dtype)
        if self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec + self.b_dec

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAEError(f"this SAE reads vectors of d_in={self.d_in} (layer {self.layer}'s residual stream of the "
                           f"model it was trained on), not width {x.shape[-1]}: use an SAE trained on this model.")

    # ---- with a model ------------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """SAEError unless the model has a residual stream of width d_in and the layer the SAE reads."""
        config = text_config(model.config)
        layers = len(adapter_for(model.config)[0].layer_list(model))
        if int(config.hidden_size) != self.d_in:
            raise SAEError(f"this SAE has d_in={self.d_in} but the model's residual stream ({config.model_type}, "
                           f"hidden_size {config.hidden_size}) does not match: use an SAE trained on this model.")
        if not 0 <= self.layer < layers:
            raise SAEError(f"this SAE reads layer {self.layer} ({self.hook_name}) but the model has layers "
                           f"0..{layers - 1}: use an SAE trained on this model.")

    def features(self, trace, k: int = 5) -> "Features":
        """Top-k active features of every token of `trace` (see `features`)."""
        return features(trace, self, k)

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, folder, storage_dtype: torch.dtype | None = None) -> Path:
        """Write the SAE in SAELens's format (cfg.json + sae_weights.safetensors) to `folder`. storage_dtype (e.g.
        torch.float16) halves the file; the cfg keeps the SAE's dtype, which loading casts back to (as SAELens does)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            weights["threshold"] = self.threshold
        save_file({n: t.to(storage_dtype or t.dtype).contiguous() for n, t in weights.items()},
                  str(folder / SAELENS_WEIGHTS))
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
               "dtype": str(self.dtype).removeprefix("torch."), "device": "cpu",
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": {**self.metadata, "hook_name": self.hook_name}}
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        return folder


# ---- loading -------------------------------------------------------------------------------------------------
def load_sae(folder, layer: int | None = None, device=None) -> SAE:
    """An SAE from a local folder in SAELens's format (cfg.json + sae_weights.safetensors) or dictionary_learning's
    (config.json + ae.pt, as in andyrdt/saes-gpt-oss-20b). `layer`: the decoder layer it reads, when its hook
    name does not say (see HOOKS)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"{folder} is not a folder: give the folder holding cfg.json and sae_weights.safetensors "
                       "(SAELens) or config.json and ae.pt (dictionary_learning).")
    if (folder / SAELENS_CFG).is_file() and (folder / SAELENS_WEIGHTS).is_file():
        sae = _load_saelens(folder, layer)
    elif (folder / DICTIONARY_LEARNING_CFG).is_file() and (folder / DICTIONARY_LEARNING_WEIGHTS).is_file():
        sae = _load_dictionary_learning(folder, layer)
    else:
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise SAEError(f"{folder} is not an SAE folder: expected cfg.json + sae_weights.safetensors (SAELens) or "
                       f"config.json + ae.pt (dictionary_learning); it holds {found or 'nothing'}. For a hub release, "
                       "point at the sub-folder of one SAE (e.g. resid_post_layer_11/trainer_0).")
    if device is not None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(sae, name) is not None:
                setattr(sae, name, getattr(sae, name).to(device))
    return sae


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise SAEError(f"{path} is not valid JSON ({e}): not an SAE config.") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{path} holds {type(cfg).__name__}, not an SAE config object.")
    return cfg


def _load_saelens(folder: Path, layer: int | None) -> SAE:
    from safetensors.torch import load_file

    cfg = _read_json(folder / SAELENS_CFG)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    try:
        weights = load_file(str(folder / SAELENS_WEIGHTS))
    except Exception as e:  # safetensors raises its own error type for garbage and truncation
        raise SAEError(f"{folder / SAELENS_WEIGHTS} is not a readable safetensors file: {e}") from None
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SAEError(f"{folder}: cfg.json dtype {cfg.get('dtype')!r} is not a floating-point torch dtype.")
    weights = {n: t.to(dtype) for n, t in weights.items()}  # the cfg's dtype, whatever the file stores (SAELens)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in weights]
    if missing:
        raise SAEError(f"{folder / SAELENS_WEIGHTS} lacks {', '.join(missing)}: not an SAELens SAE "
                       f"(it holds {sorted(weights)[:8]}).")
    for key in ("d_in", "d_sae"):
        if key in cfg and cfg[key] != {"d_in": weights["W_enc"].shape[0], "d_sae": weights["W_enc"].shape[1]}[key]:
            raise SAEError(f"{folder}: cfg.json says {key}={cfg[key]} but W_enc is {list(weights['W_enc'].shape)}.")
    architecture, k = cfg.get("architecture", "standard"), cfg.get("k")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if activation == "topk":  # pre-6.0 SAELens: a "standard" SAE with a topk activation
        architecture, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if isinstance(k, float) and k.is_integer():  # SAELens allows a float k (BatchTopK)
        k = int(k)
    threshold = weights.get("threshold")
    if architecture == "batchtopk":  # a training checkpoint: SAELens turns its threshold into a JumpReLU one
        if "topk_threshold" not in weights:
            raise SAEError(f"{folder}: a batchtopk SAE without topk_threshold cannot be used for inference.")
        architecture, threshold = "jumprelu", torch.full_like(weights["b_enc"], float(weights["topk_threshold"]))
    if architecture not in ARCHITECTURES:
        raise SAEError(f"{folder}: architecture {architecture!r} is not supported (supported: "
                       f"{', '.join(ARCHITECTURES)}, and batchtopk checkpoints).")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", False, "expected_average_only_in"):
        raise SAEError(f"{folder}: normalize_activations={normalize!r} rescales each input and undoes it on decode; "
                       "the workbench supports 'none' (and 'expected_average_only_in', applied as SAELens's "
                       "load_from_disk does: not at all).")
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEError(f"{folder}: reshape_activations={cfg['reshape_activations']!r} (an attention hook_z SAE): "
                       "only residual-stream SAEs are supported.")
    scaling = weights.get("scaling_factor")
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEError(f"{folder}: a finetuning scaling_factor is not supported.")
    hook_name = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
    if layer is None and hook_name:
        layer = hook_layer(hook_name)
    elif layer is None:  # no hook name: an old config's hook_layer, read as that layer's output
        if cfg.get("hook_layer") is None:
            raise SAEError(f"{folder}: cfg.json names no hook point: pass load_sae(folder, layer=L).")
        layer = cfg["hook_layer"]
    return SAE(weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], architecture,
               _layer(layer), hook_name or f"blocks.{layer}.hook_resid_post", k=k,
               threshold=threshold if architecture == "jumprelu" else None,
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
               rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
               metadata=metadata, path=folder)


def _load_dictionary_learning(folder: Path, layer: int | None) -> SAE:
    cfg = _read_json(folder / DICTIONARY_LEARNING_CFG)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise SAEError(f"{folder / DICTIONARY_LEARNING_CFG} has no trainer.dict_class: not a dictionary_learning SAE.")
    try:
        state = torch.load(folder / DICTIONARY_LEARNING_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SAEError(f"{folder / DICTIONARY_LEARNING_WEIGHTS} is not a readable tensor file: {e}") from None
    kind = trainer["dict_class"]
    get = state.get
    W_enc = get("W_enc") if "W_enc" in state else get("encoder.weight").T if "encoder.weight" in state else None
    W_dec = get("W_dec") if "W_dec" in state else get("decoder.weight").T if "decoder.weight" in state else None
    b_enc = get("b_enc", get("encoder.bias"))
    b_dec = get("b_dec", get("bias", get("decoder_bias")))
    if any(t is None for t in (W_enc, W_dec, b_enc, b_dec)):
        raise SAEError(f"{folder / DICTIONARY_LEARNING_WEIGHTS} lacks encoder/decoder weights (it holds "
                       f"{sorted(state)[:8]}).")
    threshold, k, architecture = None, None, "standard"
    if kind in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        if "threshold" not in state:
            raise SAEError(f"{folder}: a {kind} without its learned threshold cannot be used for inference.")
        architecture, threshold = "jumprelu", state["threshold"]  # inference: the threshold, not a batch top-k
        if threshold.ndim == 0:
            threshold = torch.full_like(b_enc, float(threshold))
    elif kind == "AutoEncoderTopK":
        architecture, k = "topk", int(trainer["k"])
    elif kind != "AutoEncoder":
        raise SAEError(f"{folder}: dictionary_learning class {kind!r} is not supported (supported: BatchTopKSAE, "
                       "MatryoshkaBatchTopKSAE, AutoEncoderTopK, AutoEncoder).")
    if layer is None:
        if trainer.get("layer") is None:
            raise SAEError(f"{folder}: the config names no trainer.layer: pass load_sae(folder, layer=L).")
        layer = int(trainer["layer"])
    return SAE(W_enc.contiguous(), b_enc, W_dec.contiguous(), b_dec, architecture, _layer(layer),
               f"blocks.{layer}.hook_resid_post", k=k, threshold=threshold,
               metadata={"model_name": trainer.get("lm_name"), "format": "dictionary_learning", "dict_class": kind},
               path=folder)


def _layer(layer) -> int:
    layer = as_integer(layer, lambda: SAEError(f"layer must be an integer, not {layer!r}."))
    if layer < 0:
        raise SAEError(f"layer {layer}: give the decoder layer the SAE reads as a non-negative index.")
    return layer


# ---- features of a trace -------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Features:
    """The k most active SAE features at every token of a trace: `indices`/`values` [tokens, k], largest first
    (a token with fewer than k active features has zeros at the end)."""

    layer: int
    tokens: list[str]
    indices: torch.Tensor  # [tokens, k] int64
    values: torch.Tensor  # [tokens, k] float32

    def at(self, position: int) -> list[tuple[int, float]]:
        """[(feature, activation), ...] active at `position` (negative counts from the end), largest first."""
        n = len(self.tokens)
        if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
            raise SAEError(f"position {position!r} is out of range: the trace has {n} tokens (0..{n - 1}).")
        return [(int(f), float(v)) for f, v in zip(self.indices[position], self.values[position]) if v > 0]

    def where(self, feature: int) -> list[tuple[int, float]]:
        """[(position, activation), ...] where `feature` is among a token's top k, strongest first."""
        hits = (self.indices == feature) & (self.values > 0)
        rows, cols = hits.nonzero(as_tuple=True)
        pairs = [(int(r), float(self.values[r, c])) for r, c in zip(rows, cols)]
        return sorted(pairs, key=lambda p: -p[1])

    def __repr__(self) -> str:
        return f"Features(layer {self.layer}, {len(self.tokens)} tokens, top {self.indices.shape[1]} per token)"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{i}</td><td><code>{html.escape(repr(s))}</code></td><td>"
            + ", ".join(f"<b>{f}</b> {v:.2f}" for f, v in self.at(i)) + "</td></tr>"
            for i, s in enumerate(self.tokens[:200]))
        more = f"<div>… {len(self.tokens) - 200} more tokens</div>" if len(self.tokens) > 200 else ""
        return (f"<div><b>SAE features</b> at layer {self.layer} (top {self.indices.shape[1]} per token)</div>"
                f"<table><tr><th>#</th><th>token</th><th>feature activation</th></tr>{rows}</table>{more}")


def features(trace, sae: SAE, k: int = 5) -> Features:
    """Encode the residual after `sae.layer` at every token of `trace` and keep the top k features per token.

    The trace must hold that layer's residuals: `s.trace(text, what=[sae.point])`. For exact
    numbers trace with dtype=torch.float32 (the default stores residuals in 16 bits).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= sae.d_sae:
        raise SAEError(f"k={k!r}: give how many features to keep per token, 1..{sae.d_sae}.")
    try:
        x = trace.residual(sae.layer)
    except CaptureError as e:
        raise SAEError(f"this SAE reads the residual stream after layer {sae.layer} ({sae.hook_name}): trace with "
                       f"what=[{sae.point!r}] ({e})") from None
    sae._check_width(x)
    indices, values = [], []
    for a in range(0, x.shape[0], _ENCODE_CHUNK):
        top = sae.encode(x[a:a + _ENCODE_CHUNK].float()).float().topk(k, dim=-1)
        indices.append(top.indices)
        values.append(top.values)
    return Features(sae.layer, list(trace.tokens.strings), torch.cat(indices), torch.cat(values))


# ---- steering --------------------------------------------------------------------------------------------------
def steer_feature(session, sae: SAE, feature: int, amount: float):
    """`with steer_feature(s, sae, f, amount):` adds amount * W_dec[f] to the output of decoder layer sae.layer
    (the residual stream the SAE reads), through the workbench's residual steering intervention."""
    sae.check_model(session.model)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.d_sae:
        raise SAEError(f"feature {feature!r} is out of range: this SAE has features 0..{sae.d_sae - 1}.")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise SAEError(f"amount must be a number (how many units of W_dec[{feature}] to add), not {amount!r}.")
    return steer(session, sae.W_dec[feature].float(), sae.layer, scale=float(amount))
