"""The MLflow UI in a real browser (headless Chromium; skipped without it): the page the
grid's closing message names opens on the grid's runs in the chart view, with each cell's
curves on the parent run, not on MLflow's GenAI overview."""

import mlflow
import pytest

from bench.mlflow_ui import browser, mlflow_ui, render
from pipelines.tracking import experiment_page, tracking_store
from pipelines.grid import Cell, GridConfig, GridLogger

pytestmark = pytest.mark.skipif(browser() is None, reason="no chromium on PATH")


def logged_grid(tmp_path) -> str:
    """A grid's parent run with two cells' curves on it, as `run_grid` logs them."""
    logger = GridLogger(GridConfig(name="ui-check", experiment="ui-check"), {})
    for editor, efficacy in (("rlsedit", 0.9), ("memit", 0.7)):
        cell = Cell(f"smollm2-135m-{editor}-s0", "smollm2-135m", editor, {"seed": 0}, tmp_path)
        history = [{"edits": n, "efficacy": efficacy * n / 6, "perplexity": 20.0 + n}
                   for n in (2, 4, 6)]
        logger.cell_on_parent(cell, history)
    return mlflow.MlflowClient().get_run(logger.parent).info.experiment_id


def test_the_named_page_opens_on_the_runs_and_their_charts(tmp_path):
    experiment_id = logged_grid(tmp_path)
    with mlflow_ui(tracking_store()) as base:
        page = render(experiment_page(experiment_id, base))   # bench/mlflow_ui.py: a PNG
    assert "ui-check" in page                          # the parent run in the runs list
    assert "efficacy (2)" in page and "perplexity (2)" in page   # a section per metric
    assert "efficacy/rlsedit" in page                  # its charts drawn
    assert "Detect Issues" not in page                 # not the GenAI overview of traces
