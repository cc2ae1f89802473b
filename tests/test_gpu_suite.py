"""The GPU suite as the GPU machine will run it, without a GPU and without the carry set downloaded.

That machine has no plotly or ipywidgets unless they are carried (scripts/gpu_wheels.sh): `import workbench` and every
part of the suite but the widget's figure must work without them. The suite writes its results after every part and
when stopped, keeps to its time budget, and the command printed for the machine is the one the README gives.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
BLOCKED = ("plotly", "ipywidgets", "IPython", "traitlets")
# A finder that refuses the widget stack, as a machine without those packages would (ModuleNotFoundError).
BLOCK = f"""
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
for _name in list(sys.modules):
    if _name.split(".")[0] in {BLOCKED!r}:
        del sys.modules[_name]
sys.meta_path.insert(0, _Missing())
"""


def _python(code: str, *, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _suite(*args: str, block: bool = False) -> str:
    """Python code that runs the suite as a script with these arguments (widget stack blocked if asked)."""
    argv = [str(SUITE), *args]
    return (BLOCK if block else "") + (
        f"import runpy, sys\nsys.path.insert(0, {str(SUITE.parent)!r})\nsys.argv = {argv!r}\n"
        f"runpy.run_path({str(SUITE)!r}, run_name='__main__')\n")


def _load_suite_module(monkeypatch):
    monkeypatch.syspath_prepend(str(SUITE.parent))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_workbench_needs_neither_plotly_nor_ipywidgets():
    run = _python(BLOCK + "import sys\nimport workbench as wb\n"
                  "s = wb.load(str(wb.fixtures.tiny_checkpoint('gpt_oss')), preset='cpu')\n"
                  "print(sorted(m for m in sys.modules if m.startswith(('workbench.views', 'workbench.ui'))))\n"
                  "try:\n    s.widget()\nexcept ImportError as e:\n    print('widget:', type(e).__name__, e.name)\n")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-2] == "[]"  # views and ui are imported only when asked for
    assert lines[-1].startswith("widget: ModuleNotFoundError")


def test_the_suite_runs_without_plotly_and_ipywidgets_skipping_only_the_widget(tmp_path):
    out = tmp_path / "suite.json"
    run = _python(_suite("--tiny", "--json", str(out), "--workdir", str(tmp_path / "work"), "--decode-tokens", "8",
                         "--trace-tokens", "16", block=True))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    decode = result["decode_tokens_per_s"]
    assert decode["generate"] > 0 and decode["chat"] > 0
    assert decode["widget"] is None and "ipywidgets" in decode["widget_skipped"]
    assert result["capture_overhead"]["routing"] > 0 and result["capture_overhead"]["attention"] > 0
    assert result["agreement"]["routing_identical"] and result["agreement"]["logits_max_abs_diff"] == 0.0
    assert result["machine"]["ipywidgets"] is None or "widget" in run.stdout  # installed here, refused by the finder
    assert "widget: the widget's imports fail here" in run.stdout  # said in the first second, before any writing
    assert {"checks", "write checkpoint", "bf16: load", "mxfp4 packed: load"} <= set(result["costs_seconds"])


def test_parts_outside_the_budget_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "suite.json"
    run = _python(_suite("--tiny", "--json", str(out), "--workdir", str(tmp_path / "work"), "--budget", "0.01"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["budget_seconds"] == 0.01
    assert "over the time budget" in out.read_text() and "over the time budget" in run.stdout
    assert {"checks", "write checkpoint"} <= set(result["costs_seconds"])
    assert set(result["footprint"]) == {"bf16", "mxfp4 packed", "mxfp4 native"}
    assert "over the time budget" in result["footprint"]["mxfp4 packed"]["skipped"]


def test_results_are_written_after_every_part_and_when_stopped(tmp_path, monkeypatch):
    suite = _load_suite_module(monkeypatch)
    path = tmp_path / "r.json"
    result = {"footprint": {}, "decode_tokens_per_s": {}, "capture_overhead": {}, "agreement": {}}
    s = suite.Suite(result, budget_s=100.0, json_path=str(path), record=False)
    assert s.part("one", lambda: 7) == 7
    assert "one" in json.loads(path.read_text())["costs_seconds"]

    def stopped():
        result["decode_tokens_per_s"]["bf16"] = {"generate": 3.0}
        raise KeyboardInterrupt("signal 15")
    with pytest.raises(KeyboardInterrupt):
        s.part("two", stopped)
    written = json.loads(path.read_text())
    assert set(written["costs_seconds"]) == {"one", "two"}
    assert written["decode_tokens_per_s"]["generate"] == 3.0 and written["decode_tokens_per_s"]["variant"] == "bf16"
    assert s.short_of(1) is None
    assert s.short_of(1000).startswith("over the time budget: needs ~1000 s")
    assert suite.Suite(dict(result), budget_s=None, json_path=None, record=False).short_of(1e9) is None


def test_sigterm_leaves_the_figures_measured_so_far(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(SUITE), "--tiny", "--json", str(out), "--workdir",
                             str(tmp_path / "work"), "--decode-tokens", "4000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the first variant's footprint is written, 4,000-token decodes come next
            written = json.loads(out.read_text()) if out.exists() else {}  # replaced whole, never half-written
            if written.get("footprint", {}).get("mxfp4 packed"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the suite wrote no results within 300 s")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout[-3000:]
    result = json.loads(out.read_text())
    assert "interrupted" in result and "stopped (signal 15)" in result["interrupted"]
    assert result["footprint"]["mxfp4 packed"]["measured_weight_bytes"] > 0 and "bf16" not in result["footprint"]
    assert not (tmp_path / "work" / "gpt-oss-tiny-random-mxfp4").exists()  # the checkpoint is still deleted


def test_the_carry_set_is_pinned_to_the_lock_and_git_ignored():
    pins = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()
    lock = {line.split("==")[0].lower(): line.split("==")[1].split()[0]
            for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines() if "==" in line}
    names = {p.split("==")[0] for p in pins}
    assert {"transformers", "plotly", "ipywidgets", "ipython", "traitlets", "comm"} <= names
    for pin in pins:
        name, version = pin.split("==")
        assert lock[name] == version, pin
    assert not {"torch", "openai-harmony", "quicktok-v1", "kernels"} & names  # there, or not needed by the suite
    for path in (".gpu-wheels/transformers-5.24.0-py3-none-any.whl", ".gpu-venv/bin/python"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_the_readme_gives_the_command_the_script_prints():
    command = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--command"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert len(command) < 2000  # the device tool's limit for one command line
    assert "--no-index" in command and ".gpu-wheels/*.whl" in command and "--json $OUT/gpu_suite.json" in command
    readme = (ROOT / "README.md").read_text()
    assert command in readme
    assert "bash scripts/gpu_wheels.sh" in readme


def test_record_stores_only_a_full_size_gpu_run(tmp_path, monkeypatch):
    suite = _load_suite_module(monkeypatch)
    import results_file

    monkeypatch.setattr(results_file, "RESULTS", tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"other": {"kept": True}}))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"size": "tiny", "device": "cpu"}))
    with pytest.raises(SystemExit, match="not a full-size GPU run"):
        suite.record_file(str(tiny))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"size": "20b", "device": "cuda:0", "total_seconds": 250.0}))
    suite.record_file(str(gpu))
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == {"other": {"kept": True}, "gpu_suite": {"size": "20b", "device": "cuda:0", "total_seconds": 250.0}}
