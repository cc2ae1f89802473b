"""gpt-oss with its MXFP4 experts kept packed, where transformers' native mxfp4 kernels are missing.

transformers keeps gpt-oss's experts (91% of its weights) in MXFP4 only with native kernels (a CUDA GPU of
compute capability >= 7.5, triton >= 3.4, the `kernels` package and a hub download). Everywhere else it
dequantizes every expert to bf16 at load: gpt-oss-20b grows from 13.8 GB to ~42 GB. This module keeps the
checkpoint's bytes instead and dequantizes, in each forward, only the experts the tokens chose:

- `PackedMxfp4Experts` replaces a layer's `mlp.experts` (transformers' `GptOssExperts`). Its parameters are
  the checkpoint's own tensors under the checkpoint's own names (`gate_up_proj_blocks` uint8 [E, 2I, H/32, 16],
  `gate_up_proj_scales` uint8 [E, 2I, H/32], `down_proj_blocks`, `down_proj_scales`, and the two biases), so
  transformers' loader fills them as they are (no conversion), 4.25 bits a value.
- Its forward takes GptOssExperts' arguments and returns what it returns. It mirrors transformers' default
  experts implementation (`grouped_mm_experts_forward`: tokens sorted and grouped by expert, the two grouped
  matmuls, bias, clamped SwiGLU, weighting, sum over the top-k) line by line; only the grouped matmul is a loop
  over the experts chosen in this forward, each expert's matrix dequantized once (or taken from the cache).
- The MLP and its router stay transformers' own (`GptOssMLP`, `GptOssTopKRouter`), so the workbench's routing
  capture and routing interventions (workbench/inspect/routing.py) work as on every other path.
- `ExpertCache` (optional, `expert_cache="2GB"`) keeps dequantized expert matrices in a least-recently-used
  cache within a byte budget, for decoding, where consecutive tokens often reuse experts.
- On the CPU the grouped matmul runs in a C++ kernel (mxfp4_kernel.py) that multiplies straight from the packed
  bytes, unless it cannot be built, `WORKBENCH_MXFP4_KERNEL=0`, an expert cache is set (the plain path serves
  it) or under `transformers_arithmetic`. Its bound against the plain path is documented there.

Exactly the same model, and where it is not bit for bit:
- `dequantize` equals transformers' `convert_moe_packed_tensors` bit for bit for every byte and every scale
  (its lookup table is built with the same `torch.ldexp` on the same FP4 values). Every MXFP4 value is exact in
  bf16, so dequantizing into float32 gives the same numbers.
- Under `transformers_arithmetic(model)` each expert matmul is transformers' own: `x @ W[in, out]` on a
  contiguous matrix in the model's dtype, which is what its grouped_mm does on the CPU. Logits and routing are
  then bit-identical to `Mxfp4Config(dequantize=True)` (preset "bf16"): tested on the tiny gpt-oss, gpt-oss-nano
  and a random gpt-oss of hidden size 1024.
- By default each expert matmul is `(W_t @ x.T).T` on the matrix as stored ([out, in]), in `compute_dtype`: float32
  on the CPU for a bf16 model (the same bf16 values; torch's bf16 matmul on a CPU without bf16 instructions,
  AVX2 here, was measured 3-6x slower than MKL's float32, and transformers' [in, out] layout ~40x slower for one
  token), the model's dtype elsewhere. Products are exact either way and sums are float32 either way: only their
  order changes, so each expert output is within one bf16 rounding step (2^-8 relative) of transformers'.
  Measured (tests/test_mxfp4_packed.py): bit-identical logits and routing on the tiny gpt-oss and gpt-oss-nano
  (hidden <= 128); on the random gpt-oss of hidden 1024, logits within 0.031 of transformers' bf16 model (which
  is itself 0.308 away from float32) and no routing change in 192 token-layers (bf16 vs float32: 9).
- On CUDA transformers runs the experts through its grouped_mm kernel: the per-expert matmuls here cannot be
  bit-identical to that, with or without transformers_arithmetic. benchmarks/gpu_suite.py measures the agreement.
- Cached matrices are held in the compute dtype: on the CPU a gpt-oss-20b expert takes 99.5 MB (float32).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import pathlib
import threading
from typing import Any

import torch
from torch import nn

from workbench.errors import PresetError
from workbench.model import compat, mxfp4_kernel
from workbench.model.expert_stages import stage
from workbench.model.mxfp4_format import _pair_table, dequantize  # noqa: F401  (re-exported: the packed path's dequantizer)
from workbench.sizes import format_bytes, parse_bytes

PATH_NATIVE, PATH_PACKED, PATH_DEQUANTIZED = "native kernels", "packed (workbench)", "dequantized"
PROJECTIONS = ("gate_up_proj", "down_proj")


# ---- dequantizing ----------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the expert matmuls: float32 on the CPU for 16-bit models (torch's bf16 matmul there, without
    bf16 instructions, was measured 3-6x slower than MKL's float32 on the same values), else the model's."""
    return torch.float32 if device.type == "cpu" and dtype.itemsize == 2 else dtype


def matrix_bytes(config: Any, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of one expert's dequantized gate_up and down matrices (in the compute dtype: 4 bytes on the CPU)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"gate_up_proj": 2 * inter * hidden * dtype_bytes, "down_proj": inter * hidden * dtype_bytes}


def expert_bytes(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes of one dequantized expert (both matrices): the smallest useful expert cache."""
    return sum(matrix_bytes(config, dtype_bytes).values())


def working_bytes(config: Any, dtype_bytes: int = 2) -> int:
    """Extra memory while one matrix is dequantized: its values and their int32 index (4 bytes a byte)."""
    largest = max(matrix_bytes(config, dtype_bytes).values())
    return largest + largest // dtype_bytes * 2


# ---- the cache -------------------------------------------------------------------------------------------
class ExpertCache:
    """Dequantized expert matrices, least recently used evicted first, within `budget_bytes`.

    Shared by every layer of one model; keys are (layer, projection, expert). Thread-safe: a generation runs
    in a background thread."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make) -> torch.Tensor:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        value = make()
        size = value.numel() * value.element_size()
        with self._lock:
            if key not in self._entries and size <= self.budget_bytes:
                while self.bytes + size > self.budget_bytes:
                    _, old = self._entries.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
                    self.evictions += 1
                self._entries[key] = value
                self.bytes += size
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"ExpertCache({format_bytes(self.bytes)} of {format_bytes(self.budget_bytes)}, {len(self)} matrices; "
                f"hits {self.hits}, misses {self.misses}, evictions {self.evictions})")


def parse_cache_budget(expert_cache, config: Any, dtype_bytes: int = 2) -> int:
    """`expert_cache=` as bytes (0 for None), or PresetError when it is not a size or holds less than one expert."""
    if expert_cache is None:
        return 0
    budget = parse_bytes(expert_cache, what="expert_cache", error=PresetError)
    smallest = expert_bytes(config, dtype_bytes)
    if budget < smallest:
        raise PresetError(
            f"expert_cache={expert_cache!r} ({format_bytes(budget)}) holds less than one dequantized expert "
            f"({format_bytes(smallest)}, the minimum): pass at least {format_bytes(smallest)}, e.g. "
            f"expert_cache='{-(-smallest * 8 // 10**9)}GB' for about 8 experts, or expert_cache=None for no cache.")
    return budget


# ---- the experts module -----------------------------------------------------------------------------------
class PackedMxfp4Experts(nn.Module):
    """gpt-oss experts as the checkpoint stores them (MXFP4 blocks and scales), dequantized per chosen expert.

    A drop-in for transformers' GptOssExperts inside GptOssMLP: same forward arguments, same result."""

    def __init__(self, config: Any, layer: int = 0, cache: ExpertCache | None = None):
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        if hidden % 32 or inter % 32:
            raise PresetError(f"mxfp4 needs hidden_size ({hidden}) and intermediate_size ({inter}) divisible by 32")
        self.num_experts, self.hidden_size, self.intermediate_size = experts, hidden, inter
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.layer, self.cache = layer, cache
        self.exact = False  # True: transformers' matmul layout (see transformers_arithmetic)
        for proj, (rows, cols) in packed_shapes(config).items():
            self.register_parameter(f"{proj}_blocks", _frozen(torch.zeros(experts, rows, cols // 32, 16, dtype=torch.uint8)))
            self.register_parameter(f"{proj}_scales", _frozen(torch.zeros(experts, rows, cols // 32, dtype=torch.uint8)))
            self.register_parameter(f"{proj}_bias", nn.Parameter(torch.zeros(experts, rows)))

    # transformers' own clamped SwiGLU with the +1 on the linear half
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        return GptOssExperts._apply_gate(self, gate_up)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.gate_up_proj_bias.dtype, self.gate_up_proj_blocks.device)

    def dequantized(self, proj: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert `expert`'s `proj` matrix as stored, [out, in], in `dtype` (default: the compute dtype, from the
        cache if there is one). The values are those of the model's dtype whatever `dtype` holds them."""
        blocks, scales = getattr(self, f"{proj}_blocks"), getattr(self, f"{proj}_scales")
        cached = dtype is None and self.cache is not None
        dtype = dtype or self.compute_dtype  # every MXFP4 value is exact in bf16, so float32 holds the same values

        def make():
            with torch.inference_mode(False), torch.no_grad():  # a cached matrix must serve any later forward
                return dequantize(blocks[expert], scales[expert], dtype)
        return self.cache.get((self.layer, proj, expert), make) if cached else make()

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [H, 2I], down [I, H]): one expert in transformers' GptOssExperts layout, in the model's dtype."""
        return tuple(self.dequantized(proj, expert, self.gate_up_proj_bias.dtype).t() for proj in PROJECTIONS)

    @property
    def kernel_path(self) -> str:
        """What runs the expert matmuls now: "packed MXFP4, C++ kernel (...)" or "packed MXFP4, plain torch (why)"."""
        if self.exact:
            return "packed MXFP4, plain torch (transformers_arithmetic: transformers' own matmul layout)"
        return mxfp4_kernel.describe(self.gate_up_proj_blocks.device.type, cache=self.cache is not None)

    def _grouped(self, x: torch.Tensor, proj: str, counts: list[int]) -> torch.Tensor:
        """transformers' grouped matmul (rows sorted by expert, `counts` rows each), one chosen expert at a time."""
        ops = None if self.exact or self.cache is not None else mxfp4_kernel.kernel(x.device)
        if ops is not None:  # the C++ kernel: straight from the packed bytes (few rows) or dequantize once + GEMM
            return mxfp4_kernel.grouped_mm(ops, x, getattr(self, f"{proj}_blocks"), getattr(self, f"{proj}_scales"),
                                           counts, name=f"layer {self.layer} {proj}")
        out = x.new_empty(x.shape[0], getattr(self, f"{proj}_blocks").shape[1])
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            rows = x[start:start + n]
            if self.exact:  # as grouped_mm on the CPU: x @ W[in, out], contiguous, in the model's dtype
                torch.mm(rows, self.dequantized(proj, expert, x.dtype).t().contiguous(), out=out[start:start + n])
            else:  # (W_t @ x.T).T on the matrix as stored, in the compute dtype (float32 on the CPU): MKL runs
                # this ~1.5-3x faster than x @ W_t.T for the few rows an expert gets (measured, 1-128 rows)
                w = self.dequantized(proj, expert)
                out[start:start + n] = torch.mm(w, rows.to(w.dtype).t()).t()
            start += n
        return out

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        # transformers.integrations.moe.grouped_mm_experts_forward, with the grouped matmul above
        num_top_k = router_indices.size(-1)
        num_tokens, hidden_dim = hidden_states.shape
        sample_weights = routing_weights.reshape(-1)
        expert_ids = router_indices.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        selected = hidden_states[perm // num_top_k].to(self.gate_up_proj_bias.dtype)
        sample_weights_g = sample_weights[perm]
        counts = torch.bincount(expert_ids_g, minlength=self.num_experts).tolist()
        token_of_row = perm // num_top_k  # for the per-expert hook points (expert_stages.stage: a no-op without)

        selected = stage(self, "in", selected, expert_ids_g, token_of_row)
        proj_out = self._grouped(selected, "gate_up_proj", counts)
        proj_out.add_(self.gate_up_proj_bias[expert_ids_g])
        proj_out = stage(self, "act", self._apply_gate(proj_out), expert_ids_g, token_of_row)
        proj_out = self._grouped(proj_out, "down_proj", counts)
        proj_out.add_(self.down_proj_bias[expert_ids_g])
        proj_out = stage(self, "out", proj_out, expert_ids_g, token_of_row)

        weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
        weighted_out = weighted_out[inv_perm]
        return weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"mxfp4 packed, cache={'none' if self.cache is None else format_bytes(self.cache.budget_bytes)}")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def packed_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection as the checkpoint stores it."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}


def packed_experts(model: nn.Module) -> list[PackedMxfp4Experts]:
    return [m for m in model.modules() if isinstance(m, PackedMxfp4Experts)]


def expert_cache(model: nn.Module) -> ExpertCache | None:
    """The model's expert cache (hits, misses, bytes), or None."""
    return next((m.cache for m in packed_experts(model) if m.cache is not None), None)


def set_expert_cache(model: nn.Module, expert_cache) -> ExpertCache | None:
    """Give a loaded packed model a fresh expert cache ("2GB", bytes) or none (None); returns it."""
    modules = packed_experts(model)
    if not modules:
        raise PresetError("this model has no packed mxfp4 experts: load it with preset='mxfp4' where native "
                          "kernels are missing to use an expert cache")
    budget = parse_cache_budget(expert_cache, model.config, modules[0].compute_dtype.itemsize)
    cache = ExpertCache(budget) if budget else None
    for m in modules:
        m.cache = cache
    return cache


@contextlib.contextmanager
def transformers_arithmetic(model: nn.Module):
    """Inside: every expert matmul uses transformers' layout (x @ W[in, out], contiguous), bit-identical to
    the dequantize-everything model; slower on CPUs without bf16 matmul instructions."""
    modules = packed_experts(model)
    before = [m.exact for m in modules]
    for m in modules:
        m.exact = True
    try:
        yield
    finally:
        for m, b in zip(modules, before):
            m.exact = b


# ---- loading ----------------------------------------------------------------------------------------------
def check_checkpoint(folder: str | pathlib.Path, config: Any) -> None:
    """Every `*_blocks`/`*_scales` tensor present with the shape and dtype the packed experts need, read from
    the safetensors headers before any weight is; PresetError naming the first bad tensor otherwise."""
    from safetensors import safe_open

    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                where.update(dict.fromkeys(f.keys(), file.name))
    headers: dict[str, Any] = {}
    experts = config.num_local_experts
    for layer in range(config.num_hidden_layers):
        for proj, (rows, cols) in packed_shapes(config).items():
            for suffix, shape in (("blocks", [experts, rows, cols // 32, 16]), ("scales", [experts, rows, cols // 32])):
                name = f"model.layers.{layer}.mlp.experts.{proj}_{suffix}"
                if name not in where:
                    raise PresetError(
                        f"the MXFP4 checkpoint at {folder} has no tensor {name} (expected uint8 {shape}): it is "
                        "incomplete or not in the openai/gpt-oss layout. Nothing was loaded; re-download or re-export it.")
                file = where[name]
                if file not in headers:
                    headers[file] = safe_open(str(folder / file), "pt")
                piece = headers[file].get_slice(name)
                found, dtype = list(piece.get_shape()), piece.get_dtype()
                if found != shape or dtype != "U8":
                    raise PresetError(
                        f"tensor {name} in {file} is {dtype} {found}, but the packed experts need uint8 {shape} "
                        f"({experts} experts x {rows} rows x {cols // 32} blocks{' x 16 bytes' if suffix == 'blocks' else ''}). "
                        "Nothing was loaded; the checkpoint does not match its config.json.")


def from_pretrained(folder: str | pathlib.Path, config: Any, *, expert_cache_bytes: int = 0, **kwargs) -> nn.Module:
    """Load an MXFP4 gpt-oss checkpoint with packed experts: transformers' own loader, given a model class whose
    experts are PackedMxfp4Experts (so the checkpoint's blocks and scales load as they are), and a copy of the
    config without quantization_config (so no quantizer dequantizes them). Checks the checkpoint first."""
    import copy

    folder = pathlib.Path(folder)
    if not folder.is_dir():  # a hub id: the files transformers would fetch (not the repo's original/ or metal/)
        from huggingface_hub import snapshot_download

        from workbench.model.sources import hub_cache_dir

        folder = pathlib.Path(snapshot_download(str(folder), cache_dir=hub_cache_dir(),
                                                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
                                                ignore_patterns=["original/*", "metal/*"]))
    check_checkpoint(folder, config)
    plain = copy.deepcopy(config)
    quantization = plain.__dict__.pop("quantization_config", None)
    compat.set_experts_implementation(plain, None)  # a plan's meta build may have set grouped_mm: ours is "eager"
    model = packed_model_class().from_pretrained(folder, config=plain, **kwargs)
    cache = ExpertCache(expert_cache_bytes) if expert_cache_bytes else None
    if not cache and model.device.type == "cpu":
        mxfp4_kernel.kernel()  # build (or find the cached build of) the C++ kernel now, not in the first forward
    for experts in packed_experts(model):
        experts.cache = cache
    if quantization is not None:  # still an MXFP4 model: save_pretrained writes the checkpoint's layout
        model.config.quantization_config = quantization
    return model


@functools.cache
def packed_model_class() -> type:
    """GptOssForCausalLM whose experts are PackedMxfp4Experts (built on first use: importing gpt-oss takes time)."""
    from transformers import GptOssForCausalLM

    class PackedGptOssForCausalLM(GptOssForCausalLM):
        """GptOssForCausalLM whose experts are PackedMxfp4Experts; everything else is transformers' own."""

        @classmethod
        def _can_set_experts_implementation(cls) -> bool:
            return False  # the packed experts have their own forward: transformers' experts functions do not apply

        def __init__(self, config):
            super().__init__(config)
            for i, layer in enumerate(self.model.layers):
                layer.mlp.experts = PackedMxfp4Experts(config, layer=i)

    return PackedGptOssForCausalLM
