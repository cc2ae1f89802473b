"""Weights are checked before they are trusted: damage is refused with the file's name and what to do.

Two checks, both cheap against the load (benchmarks/bench_file_checks.py measures them):
- before loading, the header of every safetensors file the model reads: it parses, and the file is as long as the
  header says (8 + header length + the last tensor's end). A truncated or garbled file is refused naming it,
  instead of transformers' bare `SafetensorError`, which names none.
- after loading, every floating-point parameter and persistent buffer of the loaded model is scanned for NaN and
  inf: random bytes over bf16 data make some with near certainty, and a trained checkpoint has none. One `sum` a
  tensor (NaN and inf propagate into it): a reduction, so memory stays flat, and measured on a CPU 1.3-1.6x faster
  than `aminmax` and ~20x faster than `isfinite(...).all()`, which allocates a mask and takes several passes.

A weight quantized on load (bitsandbytes int8/nf4) no longer shows a NaN it was read with: its floating-point
original is scanned in the file instead. What cannot be seen this way: damage in integer tensors stored as such
(packed MXFP4 expert bytes, where every byte is a valid value); their count is reported as not scanned. MXFP4 scales
are checked for the one code that means NaN (0xFF).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WeightsFileError

_E8M0_NAN = 255  # the MXFP4 (E8M0) scale byte that means NaN
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the float dtypes a NaN can hide in
_COUNT_CHUNK = 1 << 24  # values per isfinite pass when counting damage: a 16 MB mask at most


@dataclasses.dataclass
class WeightCheck:
    """What the checks covered and what they cost."""

    files: int = 0  # safetensors files whose header and size were checked
    tensors: int = 0  # tensors scanned for non-finite values
    values: int = 0  # values in them
    in_file: int = 0  # of those, weights quantized on load, scanned in the file they were read from
    not_scanned: int = 0  # integer tensors in the checkpoint too (packed MXFP4 blocks): every value is valid
    offloaded: int = 0  # tensors on disk (meta device): not in memory to scan
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): the steadier measure on a shared machine
    skipped: str = ""  # why nothing was checked (check_weights=False)

    def __str__(self) -> str:
        return self.describe()

    def describe(self, load_seconds: float | None = None) -> str:
        """In words; with `load_seconds`, the cost also as a share of the load."""
        if self.skipped:
            return f"not checked ({self.skipped})"
        files = f"{self.files} safetensors file{'s' * (self.files != 1)} (header, size)" if self.files else \
            "no safetensors file (GGUF, or not on this machine)"
        share = f", {self.seconds / load_seconds:.0%} of the load time" if load_seconds else ""
        in_file = f"; {self.in_file} of them quantized on load, so scanned in the file" if self.in_file else ""
        text = (f"{files} and {self.tensors} tensors ({_count(self.values)} values, all finite{in_file}) in "
                f"{self.seconds:.2f} s{share}")
        if self.not_scanned:
            text += f"; {self.not_scanned} integer tensors (quantized in the checkpoint) cannot be checked this way"
        if self.offloaded:
            text += f"; {self.offloaded} offloaded tensors not scanned"
        return text


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


# ---- which files -----------------------------------------------------------------------------------------------
def weight_files(source: Any) -> list[Path]:
    """The safetensors files `from_pretrained` reads for `source` that are on this machine: the files of
    model.safetensors.index.json, else model.safetensors; from the folder, or from the Hugging Face cache for a hub
    id ([] for a .gguf, a config, or a hub model not downloaded yet)."""
    if source.gguf_file or source.kind not in ("local", "hub"):
        return []
    find = (lambda name: _cached_file(source.name, name)) if source.kind == "hub" else \
        (lambda name: Path(source.path) / name)
    index = find("model.safetensors.index.json")
    if index is not None and index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        # a listed file that is missing is checked too (and refused): the download is incomplete
        return [index.parent / n for n in names] if source.kind == "local" else \
            [p for p in (find(n) for n in names) if p is not None]
    single = find("model.safetensors")
    return [single] if single is not None and single.is_file() else []


def _cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    from workbench.model.sources import hub_cache_dir

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def weight_map(files: list[Path]) -> dict[str, Path]:
    """Checkpoint tensor name -> the file holding it (from the index, or one file's header)."""
    if not files:
        return {}
    index = files[0].parent / "model.safetensors.index.json"
    if index.is_file():
        return {k: files[0].parent / v for k, v in json.loads(index.read_text()).get("weight_map", {}).items()}
    return {name: file for file in files for name in _read_header(file, "")[0] if name != "__metadata__"}


# ---- before loading: headers and sizes ---------------------------------------------------------------------------
def check_files(files: list[Path], source: Any) -> None:
    """Refuse (WeightsFileError naming the file) a missing, truncated or header-garbled safetensors file."""
    for file in files:
        _read_header(file, remedy(source, file))


def _read_header(file: Path, remedy: str) -> tuple[dict, int]:
    """The parsed header and the length the file must have; WeightsFileError if either is wrong."""
    def damaged(what: str) -> WeightsFileError:
        return WeightsFileError(f"{file} is damaged: {what}. Nothing was loaded. {remedy}")

    if not file.is_file():
        raise WeightsFileError(f"{file} is missing (the model's index lists it): the download is incomplete. "
                               f"Nothing was loaded. {remedy}")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"it has only {size} bytes")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise damaged(f"its header claims {length:,} bytes but the file has {size:,} bytes in all (truncated, or "
                          "the header is garbled)")
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # not JSON, or not a header
            raise damaged(f"its header is not a safetensors header ({type(e).__name__}: {e})") from None
    need = 8 + length + end
    if size < need:
        raise damaged(f"it is truncated: {size:,} bytes, its header needs {need:,} ({need - size:,} missing)")
    return header, need


def remedy(source: Any, file: Path | None = None) -> str:
    """What to do about a damaged weights file of `source`, in words."""
    if source.kind == "hub":
        folder = file.parents[2] if file is not None and len(file.parents) > 2 else "its folder in the hub cache"
        return (f"Download it again: `huggingface-cli download {source.name} --force-download`, or delete "
                f"{folder} and load again.")
    return ("Replace it with a good copy: copy, download or export the model again (for a model from the hub, "
            f"`huggingface-cli download <repo id> --local-dir {source.path} --force-download`).")


def read_error(error: Exception, source: Any, files: list[Path]) -> WeightsFileError | None:
    """A WeightsFileError for an error transformers raised while reading the weights, naming the damaged file
    when a header check finds it (files may have been downloaded during the failed load), else the files; None for
    an OSError that is no file system error (the hub unreachable, a missing repo: transformers' message says it)."""
    try:
        check_files(weight_files(source) or files, source)
    except WeightsFileError as found:
        return found
    if isinstance(error, OSError) and error.errno is None:
        return None
    names = ", ".join(str(f) for f in files) or source.path or source.name
    return WeightsFileError(f"reading the weights of {source.name} failed ({names}): {type(error).__name__}: {error}.\n"
                            f"A damaged or incomplete file? {remedy(source)} (A file written by a newer safetensors? "
                            "`pip install -U safetensors transformers`.)")


# ---- after loading: non-finite values ------------------------------------------------------------------------
def scan(model: torch.nn.Module, where: dict[str, Path], source: Any, check: WeightCheck) -> None:
    """Scan every floating-point parameter and persistent buffer of `model` for NaN/inf (and packed MXFP4 scales for
    the E8M0 NaN code); WeightsFileError naming the parameters, their file and how many values are bad."""
    bad: list[tuple[str, int, int]] = []  # (name, bad values, values)
    seen: set[int] = set()
    opened: dict[Path, Any] = {}
    lookup_only = _lookup_only_table(model)
    for name, t in _stored_tensors(model):
        if id(t) in seen:  # tied weights once
            continue
        seen.add(id(t))
        if t.device.type == "meta":
            check.offloaded += 1
            continue
        t = t.detach()
        if t.dtype == torch.uint8 and name.endswith("_scales"):  # MXFP4 scales, as the packed path keeps them
            nonfinite = int((t == _E8M0_NAN).sum())
        elif not t.is_floating_point():
            t = _float_original(name, where, opened)
            if t is None:
                check.not_scanned += 1
                continue
            check.in_file += 1
            nonfinite = 0 if _all_finite(t) else _count_nonfinite(t)
        else:
            nonfinite = 0 if _all_finite(t) else _count_nonfinite(t)
        check.tensors += 1
        check.values += t.numel()
        if lookup_only is not None and t.data_ptr() == lookup_only.data_ptr() and t.shape == lookup_only.shape:
            _page_out(t)
        if nonfinite:
            bad.append((name, nonfinite, t.numel()))
    if bad:
        raise WeightsFileError(_damage_message(bad, where, source))


def _lookup_only_table(model: torch.nn.Module) -> torch.Tensor | None:
    """The input embedding's weight when nothing else reads it: a forward reads only its tokens' rows of it."""
    try:
        table = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return None if output is not None and getattr(output, "weight", None) is table else table


def _page_out(t: torch.Tensor) -> None:
    """Hand back to the kernel the pages the scan read of a memory-mapped tensor a forward reads only rows of (the
    input embedding: 1.16 GB of gpt-oss-20b would otherwise stay resident, measured, for rows no prompt uses).
    madvise(MADV_PAGEOUT) reclaims clean file pages, which are read again from the page cache or the file when
    needed, and leaves memory that cannot be reclaimed (a copy in RAM without swap) where it is: nothing is lost.
    Linux 5.4+; elsewhere, or on any error, it does nothing."""
    import ctypes
    import mmap
    import sys

    if t.device.type != "cpu" or not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
        end = t.data_ptr() + t.numel() * t.element_size()
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 21)  # 21 = MADV_PAGEOUT
    except (OSError, AttributeError):
        pass


def _stored_tensors(model: torch.nn.Module):
    """Parameters and persistent buffers: what a checkpoint stores (a non-persistent buffer is computed, and may
    hold -inf on purpose, e.g. a mask)."""
    yield from model.named_parameters(remove_duplicate=False)
    for module_name, module in model.named_modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, b


def _float_original(name: str, where: dict[str, Path], opened: dict[Path, Any]) -> torch.Tensor | None:
    """The checkpoint's floating-point tensor that integer parameter `name` was quantized from on load (bitsandbytes
    keeps the checkpoint's names), read from its file; None when the checkpoint holds it as integers too."""
    from safetensors import safe_open

    file = where.get(name)
    if file is None:
        return None
    if file not in opened:
        opened[file] = safe_open(str(file), framework="pt")
    if opened[file].get_slice(name).get_dtype() not in _FLOAT_DTYPES:
        return None
    return opened[file].get_tensor(name)


def _all_finite(t: torch.Tensor) -> bool:
    try:
        if torch.isfinite(t.sum()):
            return True
        # a non-finite sum: damage, or finite values whose sum overflows (float16 can): aminmax cannot overflow
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    except (RuntimeError, NotImplementedError):  # a dtype without sum or aminmax (float8): count instead
        return _count_nonfinite(t) == 0


def _count_nonfinite(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + _COUNT_CHUNK].float())).sum())
               for i in range(0, flat.numel(), _COUNT_CHUNK))


def _file_of(name: str, where: dict[str, Path]) -> Path | None:
    """The checkpoint file of parameter `name`; the loaded name may differ from the checkpoint's by a prefix."""
    if name in where:
        return where[name]
    for key, file in where.items():
        if key.endswith("." + name) or name.endswith("." + key):
            return file
    files = set(where.values())
    return files.pop() if len(files) == 1 else None


def _damage_message(bad: list[tuple[str, int, int]], where: dict[str, Path], source: Any) -> str:
    files = [_file_of(name, where) for name, _, _ in bad]
    lines = [f"  {name}: {n:,} of {total:,} values are NaN or inf" + (f" (from {file})" if file else "")
             for (name, n, total), file in zip(bad[:5], files)]
    if len(bad) > 5:
        lines.append(f"  ... and {len(bad) - 5} more tensors")
    named = sorted({str(f) for f in files if f is not None})
    culprit = " and ".join(named) + (" is" if len(named) == 1 else " are") if named else \
        f"the weights files of {source.name} are"
    holds = f"{len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'}"
    return (f"the weights of {source.name} are damaged: {holds} NaN or inf, which a trained checkpoint never has "
            "(the model would answer garbage):\n" + "\n".join(lines)
            + f"\n{culprit} corrupted (a broken download, copy or disk). {remedy(source, files[0])}")


@contextlib.contextmanager
def timed(check: WeightCheck):
    """Add the wall and CPU time of the block to `check` (also when it raises)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield check
    finally:
        check.seconds += time.perf_counter() - start
        check.cpu_seconds += time.process_time() - cpu
