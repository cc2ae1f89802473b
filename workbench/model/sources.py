"""What did the user pass? A config, a local folder, a .gguf file or a hub id: resolved without weights.

`resolve` reads only the configuration. It never downloads weights, and it reaches the hub only when
the model is not already in the local Hugging Face cache and the hub is allowed and reachable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from workbench.errors import ModelNotFoundError, NotACausalLMError

DATA_DIR = Path(__file__).parent / "data"

# Hub ids whose real config.json ships with the workbench (workbench/model/data/<file>.json), so that
# `plan("openai/gpt-oss-20b")` works before anything is downloaded. Planning only: loading needs the weights.
KNOWN_CONFIGS = {
    "openai/gpt-oss-20b": "gpt-oss-20b.json",
    "openai/gpt-oss-120b": "gpt-oss-120b.json",
}

HUB_PROBE_TIMEOUT_S = 3.0


@dataclasses.dataclass
class Source:
    """Where a model comes from, and its config."""

    kind: str  # "config" | "local" | "hub" | "gguf"
    name: str  # readable: the hub id, the folder or file name
    path: str | None  # the local folder (None for a config object or a hub id)
    gguf_file: str | None  # the .gguf file name inside `path`
    config: Any  # a transformers PretrainedConfig
    note: str = ""  # where the config was read from, in words


# ---- the entry point -------------------------------------------------------------------
def resolve(model: Any, *, trust_remote_code: bool = False) -> Source:
    """Resolve a config object, local folder, .gguf path or hub id into a `Source` (config only).

    Raises ModelNotFoundError when nothing can be found (with what to do about it) and
    NotACausalLMError when the model is not a decoder-only language model.
    """
    from transformers import PretrainedConfig

    if isinstance(model, Source):
        return model
    if isinstance(model, PretrainedConfig):
        name = getattr(model, "name_or_path", "") or f"{model.model_type} config"
        source = Source("config", name, None, None, model, "config object passed in")
    elif isinstance(model, (str, os.PathLike)):
        source = _resolve_string(os.fspath(model), trust_remote_code)
    else:
        raise TypeError(
            f"expected a hub id, a folder, a .gguf path or a transformers config, got {type(model).__name__}"
        )
    require_causal_lm(source.config, source.name)
    return source


def _resolve_string(model: str, trust_remote_code: bool) -> Source:
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{model} is a file but not a .gguf file: pass the folder holding config.json and the "
                "weights, a .gguf file, or a hub id"
            )
        return _from_gguf(path.parent, path.name)
    if path.is_dir():
        return _from_folder(path, trust_remote_code)
    if _looks_like_path(model):
        raise ModelNotFoundError(f"no such file or folder: {model}")
    return _from_hub(model, trust_remote_code)


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else the user typed was meant as a path.
    return model.startswith((".", "/", "~")) or model.lower().endswith(".gguf") or model.count("/") > 1 \
        or "\\" in model or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model)


# Folder names that say how a model is stored, not which model it is (gpt-oss-nano ships "nano/bf16", "nano/mxfp4").
_LAYOUT_NAMES = {"bf16", "fp16", "fp32", "float32", "bfloat16", "mxfp4", "int8", "nf4", "original", "model"}


def folder_name(folder: Path) -> str:
    """A readable model name for a local folder: its name, or "parent/name" when the name is only a layout."""
    folder = folder.resolve() if str(folder) else Path(".").resolve()
    if folder.name.lower() in _LAYOUT_NAMES and folder.parent.name:
        parent = folder.parent.name
        return f"gpt-oss-{parent} ({folder.name})" if parent == "nano" else f"{parent}/{folder.name}"
    return folder.name or str(folder)


def _from_folder(folder: Path, trust_remote_code: bool) -> Source:
    from transformers import AutoConfig

    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        return Source("local", folder_name(folder), str(folder), None, config, f"config.json in {folder}")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(folder, ggufs[0])
    if ggufs:
        raise ModelNotFoundError(
            f"{folder} has no config.json and several .gguf files ({', '.join(ggufs)}): pass the path of one of them"
        )
    raise ModelNotFoundError(f"{folder} has neither a config.json nor a .gguf file")


def _from_gguf(folder: Path, filename: str) -> Source:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), gguf_file=filename)
    except ImportError as e:  # the gguf package is an optional dependency
        raise ModelNotFoundError(f"reading {filename} needs the gguf package: pip install gguf ({e})") from e
    return Source("gguf", filename, str(folder), filename, config, f"GGUF metadata of {folder / filename}")


# ---- the Hugging Face hub --------------------------------------------------------------
def _from_hub(model_id: str, trust_remote_code: bool) -> Source:
    from transformers import AutoConfig

    cache_dir = hub_cache_dir()
    try:
        config = AutoConfig.from_pretrained(
            model_id, local_files_only=True, cache_dir=cache_dir, trust_remote_code=trust_remote_code
        )
        return Source("hub", model_id, None, None, config, f"config from the local Hugging Face cache ({cache_dir})")
    except OSError:
        pass  # not cached: try the hub below, if we may
    why_offline = offline_reason()
    if why_offline:
        raise ModelNotFoundError(_not_cached_message(model_id, cache_dir, why_offline))
    try:
        config = AutoConfig.from_pretrained(model_id, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelNotFoundError(
            f"{model_id!r} could not be read from the Hugging Face hub: {e}\n"
            "Check the spelling (owner/name), log in with `huggingface-cli login` for gated models, "
            "or pass a local folder / .gguf path."
        ) from e
    return Source("hub", model_id, None, None, config, "config.json downloaded from the Hugging Face hub")


def _not_cached_message(model_id: str, cache_dir: str, why_offline: str) -> str:
    known = f" (`workbench.plan` can still plan {model_id} from its bundled config)" if _known_file(model_id) else ""
    return (
        f"{model_id!r} is not in the local Hugging Face cache ({cache_dir}) and the hub is not available here: "
        f"{why_offline}.{known}\n"
        f"To get it: on a machine with internet run `huggingface-cli download {model_id}` "
        f"(or `hf download {model_id}`), "
        f"then copy its cache folder here (or point HF_HOME at it); or pass a local folder holding config.json and "
        "the weights, or the path of a .gguf file."
    )


def hub_cache_dir() -> str:
    """The hub cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline_reason() -> str | None:
    """Why the hub cannot be used now (offline mode or unreachable), or None when it can."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} (offline mode)"
    return _probe_hub()


def _probe_hub() -> str | None:
    """Try the hub endpoint with a short timeout; a thread bounds DNS stalls, which urllib's timeout does not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # an HTTP answer, even an error, means the hub is reachable
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            result.append(f"{endpoint} is unreachable ({type(e).__name__}: {e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{endpoint} did not answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


# ---- bundled configs (planning only) ------------------------------------------------------
def _known_file(model_id: str) -> Path | None:
    filename = {k.lower(): v for k, v in KNOWN_CONFIGS.items()}.get(str(model_id).lower())
    return DATA_DIR / filename if filename else None


def known_config(model_id: str) -> Any | None:
    """The bundled real config of a well-known hub id (see KNOWN_CONFIGS), or None."""
    from transformers import CONFIG_MAPPING

    path = _known_file(model_id)
    if path is None:
        return None
    values = json.loads(path.read_text())
    config = CONFIG_MAPPING[values["model_type"]].from_dict(values)
    config.name_or_path = model_id
    return config


def known_source(model_id: str) -> Source | None:
    """A hub Source built from the bundled config, for planning before any download; None if unknown."""
    config = known_config(model_id)
    if config is None:
        return None
    note = (f"bundled copy of the real config.json (workbench/model/data/{_known_file(model_id).name}); "
            "nothing downloaded yet")
    return Source("hub", model_id, None, None, config, note)


# ---- what kind of model ----------------------------------------------------------------
def is_causal_lm(config: Any) -> bool:
    """True when AutoModelForCausalLM can build this config as a decoder-only language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    # Encoder families (BERT, RoBERTa, ...) have a causal head only when configured as decoders;
    # decoder-only configs do not carry `is_decoder` at all in transformers 5.
    return getattr(config, "is_decoder", True) is not False


def require_causal_lm(config: Any, name: str | None = None) -> None:
    """Raise NotACausalLMError unless `config` is a decoder-only causal LM."""
    if is_causal_lm(config):
        return
    model_type = getattr(config, "model_type", None)
    kind = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else \
        "an encoder (masked-LM) model" if getattr(config, "is_decoder", None) is False else \
        "not a model type AutoModelForCausalLM knows"
    raise NotACausalLMError(
        f"not a causal LM: {name or model_type} (model_type {model_type!r}) is {kind}; "
        "the workbench needs AutoModelForCausalLM-compatible (decoder-only) models such as gpt-oss, Llama, "
        "Qwen, Mixtral or OLMoE"
    )


def quant_method(config: Any) -> str | None:
    """The checkpoint's own quantization ("mxfp4", "gptq", ...) from its config, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers stores an enum on config objects
    return str(method).lower() if method is not None else None


def is_mxfp4_checkpoint(config: Any) -> bool:
    """True for a checkpoint stored in MXFP4 (the released gpt-oss weights)."""
    return quant_method(config) == "mxfp4"
