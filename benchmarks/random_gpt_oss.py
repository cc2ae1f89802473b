"""Random gpt-oss checkpoints in the real MXFP4 layout, written shard by shard (no hub, no bf16 experts).

    from random_gpt_oss import gpt_oss_config, write_random_mxfp4
    folder = write_random_mxfp4(gpt_oss_config("20b"), "/tmp/gpt-oss-20b-random")   # ~13.8 GB

The tensor names, shapes and dtypes are those of openai/gpt-oss-20b: experts as `*_blocks`/`*_scales` uint8
plus bf16 biases, everything else bf16, the real `quantization_config`, a `model.safetensors.index.json`.
They are read off the workbench's packed model class built on the meta device, so the layout is the one the
loader expects. Values are seeded: expert bytes uniform (every FP4 code), scales 2^-7 or 2^-8 (weights of
RMS ~0.02, like a trained 2880-wide layer), other matrices normal with std 1/sqrt(fan-in), norms 1. Each
tensor is generated in row chunks and each shard saved before the next is built, so memory stays at about
one shard. The tokenizer is the small harmony fixture BPE (its ids are a subset of the 201,088-row vocab).
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from workbench.model import mxfp4_packed, sources

SIZES = {  # overrides of the bundled gpt-oss-20b config
    "20b": {},
    "tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                 sliding_window=4, vocab_size=555),
}


def gpt_oss_config(size: str = "20b", **overrides):
    """The bundled openai/gpt-oss-20b config (with its quantization_config), at `size` ("20b" or "tiny")."""
    from workbench.fixtures import build_tokenizer

    config = sources.known_config("openai/gpt-oss-20b")
    overrides = {**SIZES[size], **overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    if "layer_types" not in overrides:  # fewer layers: the first ones of gpt-oss-20b's sliding/full alternation
        config.layer_types = list(config.layer_types)[:config.num_hidden_layers]
    if config.vocab_size < 201088:  # a small vocab: the fixture tokenizer's special ids
        tok = build_tokenizer(harmony=True)
        config.vocab_size = max(config.vocab_size, len(tok))
        config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.convert_tokens_to_ids("<|return|>")
    return config


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of the MXFP4 checkpoint, from the packed model on the meta device."""
    from accelerate import init_empty_weights

    plain = json.loads(config.to_json_string())
    plain.pop("quantization_config", None)
    from transformers import GptOssConfig

    with init_empty_weights(include_buffers=False):
        model = mxfp4_packed.packed_model_class()(GptOssConfig(**plain))
    tensors = []
    for name, p in model.named_parameters():
        dtype = p.dtype if p.dtype == torch.uint8 else torch.bfloat16
        tensors.append((name, tuple(p.shape), dtype))
    return tensors


def _values(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("_scales"):
        return torch.randint(119, 121, shape, dtype=torch.uint8, generator=generator)  # 2^-8 or 2^-7
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".sinks"):
        return (torch.randn(shape, generator=generator) * 0.5).to(dtype)
    if name.endswith("bias"):
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    std = 0.5 if "embed_tokens" in name else 1 / math.sqrt(shape[-1])
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, 2**24 // max(1, math.prod(shape[1:])))  # float32 temporaries of ~64 MB
    for start in range(0, shape[0], rows):
        chunk = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=generator)
        out[start:start + rows] = chunk.mul_(std)
    return out


def write_random_mxfp4(config, folder: str | pathlib.Path, *, seed: int = 0, shard_bytes: int = 2 * 10**9,
                       tokenizer: bool = True) -> pathlib.Path:
    """Write a random gpt-oss checkpoint in the MXFP4 layout to `folder`; returns the folder."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(config)
    shards, size = [[]], 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {name: _values(name, shape, dtype, generator) for name, shape, dtype in shard}
        total += sum(t.numel() * t.element_size() for t in data.values())
        save_file(data, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(data, file))
        del data
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    if tokenizer:
        from transformers import GenerationConfig

        from workbench.fixtures import build_tokenizer

        tok = build_tokenizer(harmony=True)
        tok.save_pretrained(folder)
        ids = tok.convert_tokens_to_ids
        GenerationConfig(eos_token_id=[ids("<|return|>"), ids("<|call|>")], pad_token_id=tok.pad_token_id,
                         bos_token_id=ids("<|startoftext|>")).save_pretrained(folder)
    return folder


def folder_bytes(folder: str | pathlib.Path) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(folder).glob("*.safetensors"))
