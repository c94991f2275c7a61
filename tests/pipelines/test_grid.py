"""The Ray pipeline on a real local cluster: sharded anchor statistics, the smoke grid
through the real actors and tasks into a real MLflow store, resume, and `ray job submit`."""

import json
import mlflow
import pytest
import torch

from pipelines.grid import grid_cells, parse_args, run_grid
from tests.conftest import CORPUS, EDIT_DATA, ROOT

SMOKE = ROOT / "pipelines" / "configs" / "smoke.yaml"


def smoke_args(tmp_path, *extra):
    """The smoke grid with absolute data paths (a Ray job runs in a copy of the tree)."""
    return ["--config", str(SMOKE), "--set", f"output_dir={tmp_path / 'grid'}",
            "--set", f"stream.data={EDIT_DATA}", "--set", f"stream.anchor.corpus={CORPUS}",
            "--set", f"heldout.corpus={CORPUS}", *extra]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_sharded_anchor_statistics_equal_the_single_process_ones(local_ray, tmp_path,
                                                                  monkeypatch):
    from tasks.anchor import AnchorArgs, anchor_stats, read_corpus
    from tasks.anchor_ray import ray_anchor_stats
    from tasks.models import load_model

    monkeypatch.setenv("RLSEDIT_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    args = AnchorArgs(corpus=str(CORPUS), n_texts=30, max_tokens=32)
    sharded = ray_anchor_stats("tiny-llama", [1, 2], args, n_shards=3)
    single = anchor_stats(load_model("tiny-llama"), [1, 2], read_corpus(CORPUS, 30), 32,
                          args.batch_size)
    for layer in (1, 2):
        assert sharded[layer].count == single[layer].count > 0
        torch.testing.assert_close(sharded[layer].cov, single[layer].cov, rtol=1e-6, atol=1e-6)
    cached = list((tmp_path / "cache" / "anchor" / "tiny-llama").glob("L*.pt"))
    assert len(cached) == 2, "the sum is cached for the next grid"


def test_smoke_grid_logs_parent_and_child_runs_and_resumes(local_ray, tmp_path):
    cfg = parse_args(smoke_args(tmp_path, "--output-json", str(tmp_path / "grid.json")))
    result = run_grid(cfg)
    client = mlflow.MlflowClient()
    parent = result["parent_run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    names = {run.info.run_name for run in children}
    assert names == {c.name for c in grid_cells(cfg)} and len(names) == 4
    for run in children:
        history = client.get_metric_history(run.info.run_id, "efficacy")
        assert [m.step for m in history] == [4, 6]
        assert client.get_metric_history(run.info.run_id, "perplexity")[-1].value > 1
        assert run.data.metrics["unedited_efficacy"] >= 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"summary.json", "config.json", "edited_layers.safetensors",
                "snapshots"} <= artifacts
        snapshots = {a.path for a in client.list_artifacts(run.info.run_id, "snapshots")}
        assert snapshots == {"snapshots/edits-4.safetensors", "snapshots/edits-6.safetensors"}
    parent_artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"comparison-tiny-llama.png", "comparison.md", "grid_summary.json"} <= parent_artifacts
    assert (tmp_path / "grid" / "comparison-tiny-llama.png").stat().st_size > 10_000
    table = json.loads((tmp_path / "grid.json").read_text())["table"]
    for editor in ("rlsedit", "memit", "alphaedit", "ft"):
        assert f"| tiny-llama-{editor}-s0 |" in table

    again = run_grid(parse_args(smoke_args(tmp_path)))   # everything done: nothing reruns
    assert again["parent_run_id"] == parent
    assert again["cells"] == result["cells"]
    assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")) == 4


def test_grid_config_errors_name_the_problem(tmp_path):
    from tasks.config import ConfigError

    with pytest.raises(ValueError, match="unknown editor 'rome'"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "editors=[rome]")))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) stream.num_edit\b"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "stream.num_edit=3")))
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "models=[gpt-9]")))
