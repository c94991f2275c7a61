"""The Ray pipeline on a real local cluster: sharded anchor statistics, the smoke grid
through the real actors and tasks into a real MLflow store, resume, a grid whose output
folder is in S3 (a real S3-compatible server on 127.0.0.1), and `ray job submit`."""

import json
import logging
import re

import mlflow
import pytest
import torch

from pipelines.grid import grid_cells, parse_args, run_grid
from tasks.storage import Location
from tasks.stream import read_checkpoint
from tests.conftest import CORPUS, DATA, EDIT_DATA, ROOT

SMOKE = ROOT / "pipelines" / "configs" / "smoke.yaml"


def colored_fraction(png) -> float:
    """Share of pixels in a saturated colour: the plotted lines (axes and text are grey)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[..., :3]
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3).mean())


def smoke_args(tmp_path, *extra):
    """The smoke grid with absolute data paths (a Ray job runs in a copy of the tree)."""
    return ["--config", str(SMOKE), "--set", f"output_dir={tmp_path / 'grid'}",
            "--set", f"stream.data={EDIT_DATA}", "--set", f"stream.anchor.corpus={CORPUS}",
            "--set", f"stream.neighbours.pool={EDIT_DATA}",
            "--set", f"heldout.corpus={CORPUS}", "--set", f"capability.data_dir={DATA}", *extra]


def test_sharded_anchor_statistics_equal_the_single_process_ones(local_ray, tmp_path,
                                                                  monkeypatch):
    from tasks.anchor import AnchorArgs, anchor_stats, read_corpus
    from tasks.models import load_model
    from tasks.remote.anchor_ray import ray_anchor_stats

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


def progress_lines(caplog, title: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{title}: ")]


def test_smoke_grid_logs_parent_and_child_runs_and_resumes(local_ray, tmp_path, monkeypatch,
                                                           caplog, capfd):
    caplog.set_level(logging.INFO, logger="rlsedit")
    cfg = parse_args(smoke_args(tmp_path, "--output-json", str(tmp_path / "grid.json")))
    result = run_grid(cfg)
    client = mlflow.MlflowClient()
    parent = result["parent_run_id"]
    lines = progress_lines(caplog, "grid smoke")   # one at the start, one per finished cell
    assert lines[0] == "grid smoke: 0/4 cells done, 0/24 edits; 4 waiting; estimating…"
    assert lines[-1].startswith("grid smoke: 4/4 cells done, 24/24 edits;")
    assert re.search(r"edits/(s|min); all done$", lines[-1]) and len(lines) >= 5
    messages = [r.getMessage() for r in caplog.records]
    assert "anchor statistics of tiny-llama, layers [1] …" in messages
    assert any(m.startswith("anchor statistics of tiny-llama, layers [1]: done in ")
               for m in messages)
    # the editor actors' constructor arguments are all inline: nothing for Ray to warn about
    assert "constructor arguments in the object store" not in capfd.readouterr().err
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
        assert 0 <= run.data.metrics["unedited_cap.rlsedit_sst2.acc"] <= 1
        capability = client.get_metric_history(run.info.run_id, "cap.rlsedit_sst2.acc")
        assert [m.step for m in capability] == [4, 6]
        assert client.get_metric_history(run.info.run_id,
                                         "cap.rlsedit_agnews_ppl.token_perplexity")[-1].value > 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"summary.json", "config.json", "edited_layers.safetensors",
                "snapshots"} <= artifacts
        snapshots = {a.path for a in client.list_artifacts(run.info.run_id, "snapshots")}
        assert snapshots == {"snapshots/edits-4.safetensors", "snapshots/edits-6.safetensors"}
    parent_artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"reports", "comparison.md", "grid_summary.json", "final_metrics.json"} <= parent_artifacts
    for editor in cfg.editors:   # each cell's curves on the parent: the chart view shows them
        assert [m.step for m in client.get_metric_history(parent, f"efficacy/{editor}")] == [4, 6]
        assert f"retention_efficacy/{editor}" in client.get_run(parent).data.metrics
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    reports = {a.path.split("/")[-1] for a in client.list_artifacts(parent, "reports")}
    kinds = ("metrics", "retention", "capability", "deviation")
    assert reports == {f"{kind}-tiny-llama.png" for kind in kinds} | {
        "comparison-tiny-llama.md", "comparison-tiny-llama.html"}
    for kind in kinds:   # next to grid_summary.json, with coloured lines drawn on it
        assert colored_fraction(tmp_path / "grid" / f"{kind}-tiny-llama.png") > 1e-3
    assert (tmp_path / "grid" / "grid_summary.json").exists()
    page = (tmp_path / "grid" / "comparison-tiny-llama.html").read_text()
    assert page.count("<tr>") == 6 and "sst2.acc" in page   # header, unedited, 4 editors
    assert "Paired differences" in (tmp_path / "grid" / "comparison-tiny-llama.md").read_text()
    cell = json.loads(next((tmp_path / "grid" / "cells").glob("*rlsedit*/summary.json")).read_text())
    assert cell["final_scores"]["edits"] == list(range(6))   # per request, for paired tests
    assert len(cell["final_scores"]["retention_efficacy"]) == 1
    assert cell["final"]["anchor_deviation"] > 0 and "efficacy_se" in cell["final"]
    table = json.loads((tmp_path / "grid.json").read_text())["table"]
    for editor in ("rlsedit", "memit", "alphaedit", "ft"):
        assert f"| tiny-llama-{editor}-s0 |" in table

    again = run_grid(parse_args(smoke_args(tmp_path)))   # everything done: nothing reruns
    assert again["parent_run_id"] == parent
    assert again["cells"] == result["cells"]
    assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")) == 4

    # re-evaluation of the grid's snapshots through evaluator actors on the same cluster
    from pipelines.reeval import parse_args as reeval_args, run_reeval

    argv = [arg for run in children for arg in ("--run-id", run.info.run_id)]
    argv += ["--first-k", "2", "--set", "evaluator_cpus=0.5"]
    scored = run_reeval(reeval_args(argv))["scored"]
    lines = progress_lines(caplog, "reeval")
    assert lines[0] == "reeval: 0/4 runs done, 0/8 snapshots; 4 waiting; estimating…"
    assert lines[-1].startswith("reeval: 4/4 runs done, 8/8 snapshots;")
    assert sorted((s["run"], s["step"]) for s in scored) == sorted(
        (name, step) for name in names for step in (4, 6))
    for run in children:
        history = client.get_metric_history(run.info.run_id, "reeval.first2.efficacy")
        assert sorted(m.step for m in history) == [4, 6]   # logged as they land
        # the grid's own retention is of the first 1 edit (10% of 6): a different metric
        assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                          "retention_efficacy")] == [4, 6]
    assert run_reeval(reeval_args(argv))["scored"] == []

    # a re-run against another tracking store (a move to a server) is refused in one line
    from pipelines.tracking import UserError, tracking_store

    store, other = tracking_store(), tmp_path / "other" / "mlflow.db"
    assert json.loads((tmp_path / "grid" / "grid_state.json").read_text())[
        "tracking_store"] == store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with pytest.raises(UserError, match=re.escape(
            f"{tmp_path / 'grid'} holds MLflow runs of the tracking store {store}, not of "
            f"sqlite:///{other}: set MLFLOW_TRACKING_URI={store} to go on there")):
        run_grid(parse_args(smoke_args(tmp_path)))
    assert not other.exists(), "nothing is logged to the other store"


def test_a_grid_keeps_its_run_state_in_object_storage(local_ray, s3_folder, tmp_path):
    """output_dir in a real S3-compatible server: the editor actor writes its checkpoints
    and snapshots there (reached through the URI's query), the driver its resume state and
    reports; nothing goes to local disk, and a re-run reads the finished grid back."""
    out = s3_folder(f"grid-{tmp_path.name}")
    args = smoke_args(tmp_path, "--set", f"output_dir={out}", "--set", "editors=[rlsedit]",
                      "--set", "capability={}")
    result = run_grid(parse_args(args))
    (cell,) = grid_cells(parse_args(args))
    assert cell.dir == Location(out) / "cells" / cell.name
    for name in ("grid_state.json", "grid_summary.json", "comparison.md",
                 "metrics-tiny-llama.png", "comparison-tiny-llama.html"):
        assert (Location(out) / name).exists(), name
    for name in ("summary.json", "evals.json", "final_scores.json", "edited_layers.safetensors",
                 "snapshots/edits-4.safetensors", "snapshots/edits-6.safetensors"):
        assert (cell.dir / name).exists(), name
    assert read_checkpoint(cell.dir / "checkpoint.pt")["position"] == 6
    assert read_checkpoint(cell.dir / "checkpoint.prev.pt")["position"] == 4
    assert not (tmp_path / "grid").exists()
    run = result["cells"][cell.name]["mlflow_run_id"]
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run, "snapshots")} == {
        "snapshots/edits-4.safetensors", "snapshots/edits-6.safetensors"}

    again = run_grid(parse_args(args))   # everything done: read back, nothing reruns
    assert again["parent_run_id"] == result["parent_run_id"]
    assert again["cells"] == result["cells"]


def test_a_live_cluster_answers_the_drivers_probe(local_ray):
    from pipelines.driver import no_answer

    assert no_answer(local_ray.get_runtime_context().gcs_address, timeout_s=5) is None


def test_grid_config_errors_name_the_problem(tmp_path):
    from tasks.config import ConfigError

    with pytest.raises(ValueError, match="unknown editor 'rome'"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "editors=[rome]")))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) stream.num_edit\b"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "stream.num_edit=3")))
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "models=[gpt-9]")))


def test_grid_variants_name_settings_of_an_editor(tmp_path):
    from pipelines.grid import _edit_layers

    cfg = parse_args(smoke_args(
        tmp_path, "--set", "editors=[rlsedit,rls-wide]",
        "--set", "variants.rls-wide={editor: rlsedit, editor_args: {mu: 7}, "
                 "stream: {layers: [1, 2], keys: {mode: rows}, values: {lr: 0.1}}}"))
    plain, wide = grid_cells(cfg)
    assert wide.name == "tiny-llama-rls-wide-s0" and wide.cfg["editor"] == "rlsedit"
    assert wide.cfg["editor_args"] == {"mu": 7} and wide.cfg["layers"] == [1, 2]
    assert wide.cfg["keys"]["mode"] == "rows" and wide.cfg["values"]["lr"] == 0.1
    assert wide.cfg["values"]["steps"] == plain.cfg["values"]["steps"] == 4  # grid's own keys kept
    assert plain.cfg["keys"]["mode"] == "bare_half" and plain.cfg["editor_args"] == {}
    assert _edit_layers("tiny-llama", [plain, wide]) == [1, 2]   # anchors cover every cell
    with pytest.raises(ValueError, match="variant 'bad' needs `editor`"):
        grid_cells(parse_args(smoke_args(tmp_path, "--set", "editors=[bad]",
                                         "--set", "variants.bad={mu: 3}")))


def test_curves_on_the_parent_are_named_by_what_tells_cells_apart(tmp_path):
    from pipelines.grid import short_label

    one = parse_args(smoke_args(tmp_path, "--set", "editors=[rlsedit,ft]"))
    assert [short_label(c, one) for c in grid_cells(one)] == ["rlsedit", "ft"]
    many = parse_args(smoke_args(tmp_path, "--set", "editors=[rlsedit]",
                                 "--set", "models=[tiny-llama,tiny-gemma3]", "--set", "seeds=[0,1]"))
    assert [short_label(c, many) for c in grid_cells(many)] == [
        "tiny-llama-rlsedit-s0", "tiny-llama-rlsedit-s1", "tiny-gemma3-rlsedit-s0",
        "tiny-gemma3-rlsedit-s1"]


@pytest.mark.parametrize("name", ["smoke", "cpu-demo", "cpu-demo-both", "cpu-1k", "full-10k", "fidelity-sweep",
                                  "fidelity-sweep-2", "gemma-layers", "gemma-300",
                                  "budget-300", "budget-1k", "cpu-10k", "tradeoff-300",
                                  "gemma-tune-300"])
def test_shipped_grid_configs_resolve(name, tmp_path):
    cfg = parse_args(["--config", str(ROOT / "pipelines" / "configs" / f"{name}.yaml"),
                      "--set", f"output_dir={tmp_path}"])
    assert grid_cells(cfg)
