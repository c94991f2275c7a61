import json
import re

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tasks.config import ConfigError
from pipelines.edit_stream import parse_args, run_stream
from tests.conftest import CORPUS, EDIT_DATA, ROOT


def tiny_args(tmp_path, *extra):
    return ["--model", "tiny-llama", "--data", str(EDIT_DATA), "--num-edits", "6",
            "--batch-size", "2", "--eval-every", "4", "--output-dir", str(tmp_path / "run"),
            "--output-json", str(tmp_path / "summary.json"),
            "--set", f"anchor.corpus={CORPUS}", "--set", "anchor.n_texts=20",
            "--set", "values.steps=4", "--set", "values.n_prefixes=1",
            "--set", "fluency_samples=2", "--set", "fluency_tokens=8", *extra]


def test_stream_edits_logs_to_mlflow_and_writes_a_summary(tmp_path, isolated_stores):
    cfg = parse_args(tiny_args(tmp_path, "--set", "experiment=stream-test"))
    summary = run_stream(cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["num_edits"] == 6 and saved["edit_layers"] == [1]
    assert [h["edits"] for h in saved["history"]] == [4, 6]  # evaluated at 4 and at the end
    assert saved["retention_first_k"] == 1
    for key in ("efficacy", "generalization", "specificity", "retention_efficacy", "fluency"):
        assert 0.0 <= saved["final"][key] <= 10.0
        assert key in saved["unedited"]
    assert saved["edits_per_second"] > 0

    run = mlflow.get_run(summary["mlflow_run_id"])
    from tasks.editors import editor_registry
    mu = float(editor_registry()["rlsedit"]["mu"])
    assert run.data.params["model"] == "tiny-llama" and run.data.params["editor.mu"] == str(mu)
    # every edit's target value is on record, and whether it converged is a metric
    assert len(saved["edit_records"]) == 6
    assert all(r["value_nll"] >= 0 and r["delta_ratio"] > 0 and 0 <= r["value_steps"] <= 4
               for r in saved["edit_records"])
    # the anchor deviation of the edited layer grows from 0; every share has its SE
    assert 0 < saved["history"][0]["anchor_deviation.L1"] == saved["history"][0]["anchor_deviation"]
    assert 0 < saved["final"]["efficacy_se"] <= 0.5 / 6 ** 0.5 + 1e-9
    for key in ("all_value_nll_mean", "all_delta_ratio_max", "unconverged_fraction",
                "anchor_deviation", "efficacy_se", "all_value_steps_mean"):
        assert key in saved["final"]
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(
            run.info.run_id, key)] == [4, 6]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "efficacy")
    assert [m.step for m in history] == [4, 6]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "edited_layers.safetensors", "snapshots"} <= artifacts
    snapshots = mlflow.MlflowClient().list_artifacts(run.info.run_id, "snapshots")
    assert [a.path for a in snapshots] == ["snapshots/edits-4.safetensors",
                                           "snapshots/edits-6.safetensors"]

    # the unedited scores: the edit requests' (disk-cached) and held-out perplexity, as a
    # grid cell has them
    cached = list((isolated_stores / "cache" / "unedited").glob("*.json"))
    assert any(json.loads(path.read_text())["scores"].items() <= saved["unedited"].items()
               for path in cached)
    assert saved["unedited"]["perplexity"] > 1 and saved["final"]["perplexity"] > 1

    weights = load_file(str(tmp_path / "run" / "edited_layers.safetensors"))
    edited = weights["model.layers.1.mlp.down_proj.weight"]
    from tasks.models import load_model
    original = load_model("tiny-llama").mlp_out(1).weight
    assert edited.shape == original.shape and not torch.equal(edited, original)


def test_rerun_resumes_from_the_checkpoint_in_its_own_tracking_store(tmp_path, monkeypatch):
    from pipelines.tracking import UserError, tracking_store

    args = tiny_args(tmp_path)
    first = run_stream(parse_args(args))
    again = run_stream(parse_args(args))  # finished run: nothing is edited twice
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["history"] == first["history"]
    with pytest.raises(UserError, match="different config"):
        run_stream(parse_args(args + ["--set", "editor_args.mu=0.5"]))

    store, other = tracking_store(), tmp_path / "other" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")   # a move to a new store
    with pytest.raises(UserError, match=re.escape(
            f"{tmp_path / 'run'} holds MLflow runs of the tracking store {store}, not of "
            f"sqlite:///{other}: set MLFLOW_TRACKING_URI={store} to go on there")):
        run_stream(parse_args(args))
    assert not other.exists(), "nothing is logged to the other store"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) valuse"):
        parse_args(tiny_args(tmp_path, "--set", "valuse.steps=3"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) editor_args.muu"):
        run_stream(parse_args(tiny_args(tmp_path, "--set", "editor_args.muu=0.1")))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        parse_args(tiny_args(tmp_path, "--batch-size", "0"))
    with pytest.raises(ValueError, match="unknown editor 'rome'"):
        run_stream(parse_args(tiny_args(tmp_path, "--editor", "rome")))
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        run_stream(parse_args(tiny_args(tmp_path, "--model", "gpt-9")))
    with pytest.raises(ValueError, match=r"edit layers \[7\] are not valid"):
        run_stream(parse_args(tiny_args(tmp_path, "--layers", "7")))


def test_a_values_key_changes_only_itself(tmp_path):
    """`values.steps=4` keeps the stream's own value defaults (the margin stop, replays in
    bfloat16 where native), not ValueArgs' class defaults; so does a YAML mapping."""
    cfg = parse_args(["--set", "values.steps=3"])
    assert (cfg.values.steps, cfg.values.stop_on, cfg.values.autocast) == (3, "margin", "auto")
    config = tmp_path / "values.yaml"
    config.write_text("values: {n_prefixes: 1}\n")
    cfg = parse_args(["--config", str(config)])
    assert (cfg.values.n_prefixes, cfg.values.stop_on, cfg.values.steps) == (1, "margin", 25)


@pytest.mark.parametrize("name", ["stream-demo.yaml", "stream-1k.yaml"])
def test_shipped_configs_parse(name):
    cfg = parse_args(["--config", str(ROOT / "pipelines" / "configs" / name)])
    assert cfg.model == "smollm2-135m" and cfg.editor == "rlsedit"


@pytest.mark.parametrize("editor,extra", [
    ("memit", []), ("ft", []),
    ("alphaedit", ["--set", "editor_args.nullspace_threshold=1.0e+9"]),  # tiny: no small eigenvalues
])
def test_baselines_run_through_the_same_stream(tmp_path, editor, extra):
    summary = run_stream(parse_args(tiny_args(tmp_path, "--editor", editor,
                                              "--set", f"run_name=tiny-{editor}", *extra)))
    assert summary["editor_settings"]["name"] == editor
    assert [h["edits"] for h in summary["history"]] == [4, 6]
    assert summary["history"][-1]["update_norm_L1"] > 0
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["editor.kind"] == editor


def test_numbers_are_coerced_and_non_numbers_refused(tmp_path):
    from tasks.editors import resolve_editor

    _, args, _ = resolve_editor("ft", {"norm_bound": "5e-4", "steps": 10.0})
    assert args.norm_bound == 5e-4 and isinstance(args.steps, int)
    with pytest.raises(ConfigError, match=r"editor_args.norm_bound must be float, got 'big'"):
        resolve_editor("ft", {"norm_bound": "big"})
    with pytest.raises(ConfigError, match=r"num_edits must be int, got 2.5"):
        parse_args(tiny_args(tmp_path, "--set", "num_edits=2.5"))


def test_a_deviation_budget_sets_mu_and_is_logged(tmp_path, isolated_stores):
    """RLSEdit with a budget picks μ at the first batch for the 3 planned batches and logs
    it with its prediction; the deviation it then measures is on record beside it."""
    cfg = parse_args(tiny_args(tmp_path, "--set", "editor_args.deviation_budget=0.01",
                               "--set", "fluency_samples=0"))
    saved = run_stream(cfg)
    final = saved["final"]
    assert final["budget_mu.L1"] > 0
    assert 0 < final["budget_predicted_deviation.L1"] <= 0.01
    assert final["anchor_deviation.L1"] > 0
    assert saved["history"][0]["budget_mu.L1"] == final["budget_mu.L1"]
