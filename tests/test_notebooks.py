"""The analysis notebooks (jupytext percent-format .py files) run against tiny runs and write their figures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_analysis import tiny_experiments

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "analysis" / "notebooks"
FIGURES = {
    "utilization": ["coactivation.png", "load_heatmap.png", "saturation.png", "utilization_over_training.png"],
    "router_comparison": ["router_comparison.png"],
    "scaling": ["scaling_flops.png", "scaling_params_active.png"],
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return tiny_experiments(tmp_path_factory)


def notebook_env(tiny_runs, name: str, figures: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": tiny_runs["uri"], "ANALYSIS_RUN": tiny_runs["ids"]["topk"],
            "ANALYSIS_EXPERIMENT": "scaling" if name == "scaling" else "routers", "ANALYSIS_FIGURES": str(figures)}


def test_every_notebook_is_a_jupytext_percent_file():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(FIGURES)
    for name in FIGURES:
        text = (NOTEBOOKS / f"{name}.py").read_text()
        assert "format_name: percent" in text and text.count("# %% [markdown]") >= 2 and "\n# %%\n" in text


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_runs_as_a_script_and_writes_its_figures(tiny_runs, tmp_path, name):
    env = {**os.environ, **notebook_env(tiny_runs, name, tmp_path), "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == FIGURES[name]
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))


def test_a_notebook_executes_in_a_jupyter_kernel(tiny_runs, tmp_path, monkeypatch):
    """The same file as a notebook (jupytext -> nbclient), when those optional tools are installed."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for key, value in notebook_env(tiny_runs, "router_comparison", tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = jupytext.read(NOTEBOOKS / "router_comparison.py")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs), "the figure is shown inline"
    assert (tmp_path / "router_comparison.png").is_file()
