"""The workbench's own cache: what it builds once and reuses (tiny checkpoints, the SmolLM2 copy, the o200k
vocabulary). Writes are atomic: a reader never sees half a file or half a folder.

    root = default_cache_dir()                          # $WORKBENCH_CACHE, or ~/.cache/gpt-oss-workbench
    folder = cached_folder("name-v1", write, cache_dir) # write(scratch) fills it the first time only
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator


def default_cache_dir() -> pathlib.Path:
    """$WORKBENCH_CACHE, or ~/.cache/gpt-oss-workbench."""
    return pathlib.Path(os.environ.get("WORKBENCH_CACHE") or pathlib.Path.home() / ".cache" / "gpt-oss-workbench")


def cached_folder(name: str, write: Callable[[pathlib.Path], object],
                  cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
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


def write_file_atomically(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write `data` beside `path` and rename it into place."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(scratch, 0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return path
