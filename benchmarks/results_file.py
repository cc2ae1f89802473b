"""benchmarks/results.json: one key per benchmark, each written by its own script (the README quotes them)."""
from __future__ import annotations

import json
import os
import pathlib

RESULTS = pathlib.Path(__file__).with_name("results.json")


def record(key: str, result: dict) -> pathlib.Path:
    """Store `result` under `key`, keeping the other benchmarks' keys; atomic (temp file + os.replace)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = result
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    return RESULTS
