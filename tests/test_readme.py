"""The README's offline quickstart runs exactly as written."""
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_names_the_test_command_ci_runs():
    ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "bash scripts/test.sh" in ci


def test_quickstart_plan_line_runs_offline():
    quickstart = _python_blocks()[0]
    first_lines = "\n".join(quickstart.splitlines()[:2])  # import + wb.plan: no download needed
    exec(compile(first_lines, "README quickstart", "exec"), {})


@pytest.mark.slow
def test_offline_quickstart_runs_as_written(smollm2_dir):
    offline = next(b for b in _python_blocks() if "default_model" in b)
    namespace = {}
    exec(compile("import workbench as wb\n" + offline, "README offline quickstart", "exec"), namespace)
    assert "Paris" in namespace["g"].text


def _block_with(marker: str) -> str:
    return next(b for b in _python_blocks() if marker in b)


def test_batches_steering_hooks_section_runs_as_written():
    namespace = {}
    exec(compile(_block_with("s.steering_vector([\"good good good\"]"), "README batches/steering section", "exec"), namespace)
    assert namespace["t"].provenance[0]["name"] == "steer" and len(namespace["batch"]) == 3


def test_hook_points_section_runs_as_written():
    namespace = {}
    exec(compile(_block_with("s.replay_routing(clean)"), "README hook points section", "exec"), namespace)
    t, clean = namespace["t"], namespace["clean"]
    assert t["blocks.1.mlp.experts.2.act"].shape[0] == len(t.positions("blocks.1.mlp.experts.2.act"))
    assert namespace["t_fixed"].routing.indices.equal(clean.routing.indices)  # replayed: the same experts
    assert [p["name"] for p in namespace["t_fixed"].provenance] == ["ablate_heads", "replay_routing"]


def test_what_the_readme_says_about_default_models_and_names_holds():
    import workbench as wb
    from workbench import fixtures

    assert '`"chat"` and `"attention"` give SmolLM2-135M-Instruct' in README
    assert wb.default_model("attention") == wb.default_model("chat") == str(fixtures.smollm2_path())
    assert wb.default_model("moe") == str(fixtures.nano_path())
    assert wb.load(str(fixtures.nano_path())).report.model == "gpt-oss-nano (bf16)"  # not the folder's name "bf16"


@pytest.mark.slow
def test_every_readme_block_runs_as_written_in_order(tmp_path, monkeypatch):
    """Every python block of the README, top to bottom in one namespace as a reader runs them, on the offline
    models: the only change is the quickstart's one parameter, MODEL, set as its own comment says."""
    import workbench as wb

    monkeypatch.chdir(tmp_path)  # blocks save files (run.wbtrace, stats.safetensors)
    namespace: dict = {}
    for i, block in enumerate(_python_blocks()):
        if 'MODEL = "openai/gpt-oss-20b"' in block:
            block = block.replace('MODEL = "openai/gpt-oss-20b"', "MODEL = str(wb.fixtures.nano_path())")
        exec(compile(block, f"README block {i}", "exec"), namespace)
    assert namespace["g"].token_ids and namespace["stats"] is not None and namespace["e"].scores.numel()
    assert wb.Trace.load(tmp_path / "run.wbtrace").tokens.ids
