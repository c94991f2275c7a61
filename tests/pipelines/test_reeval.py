"""pipelines.reeval on a real MLflow run of a tiny edit stream: it adds retention and
capability scores per snapshot, leaves what was logged alone, and a second call adds
nothing."""

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipelines.edit_stream import parse_args as stream_args, run_stream
from pipelines.reeval import parse_args, run_reeval
from tasks.data import load_requests
from tasks.evaluate.metrics import aggregate, score_requests
from tasks.models import load_model
from tests.conftest import EDIT_DATA
from tests.pipelines.test_edit_stream import tiny_args


def all_history(client, run_id):
    run = client.get_run(run_id)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in run.data.metrics}


def test_reeval_adds_scores_per_snapshot_and_a_second_call_adds_nothing(tmp_path):
    summary = run_stream(stream_args(tiny_args(tmp_path, "--set", "experiment=reeval-test")))
    run_id = summary["mlflow_run_id"]
    client = mlflow.MlflowClient()
    before = all_history(client, run_id)

    argv = ["--experiment", "reeval-test", "--first-k", "3", "--no-ray",
            "--set", "capability.tasks=[rlsedit_sst2]", "--set", "capability.limit=2"]
    latest = run_reeval(parse_args(argv + ["--last-only"]))
    assert [s["step"] for s in latest["scored"]] == [6]
    rest = run_reeval(parse_args(argv))   # the snapshot at 4 is all that is left
    assert [s["step"] for s in rest["scored"]] == [4]

    after = all_history(client, run_id)
    for key, points in before.items():   # nothing logged before has changed
        assert after[key] == points, key
    for key in ("reeval.first3.efficacy", "reeval.first3.specificity", "cap.rlsedit_sst2.acc"):
        assert sorted(step for step, _ in after[key]) == [4, 6], key
    assert [step for step, _ in after["unedited_reeval.first3.efficacy"]] == [0]
    assert [step for step, _ in after["unedited_cap.rlsedit_sst2.acc"]] == [0]

    # the score at 6 edits is that of the run's final weights on its first 3 requests
    lm = load_model("tiny-llama")
    weights = load_file(str(tmp_path / "run" / "edited_layers.safetensors"))
    with torch.no_grad():
        for name, weight in weights.items():
            lm.model.get_parameter(name).copy_(weight)
    expected = aggregate(score_requests(lm, load_requests(EDIT_DATA, limit=3)))
    assert dict(after["reeval.first3.efficacy"])[6] == pytest.approx(expected["efficacy"])
    assert dict(after["reeval.first3.generalization"])[6] == pytest.approx(
        expected["generalization"])

    again = run_reeval(parse_args(argv))
    assert again["scored"] == []
    assert all_history(client, run_id) == after

    more = run_reeval(parse_args(argv + ["--set", "capability.tasks=[rlsedit_sst2,"
                                                  "rlsedit_agnews]"]))
    assert [s["step"] for s in more["scored"]] == [4, 6]   # only the task not yet scored
    assert all(set(s) == {"run", "step", "cap.rlsedit_agnews.acc", "cap.rlsedit_agnews.acc_norm",
                          "timing.capability_seconds"} for s in more["scored"])
    assert all(s["timing.capability_seconds"] > 0 for s in more["scored"])


def test_reeval_refuses_bad_requests():
    with pytest.raises(ValueError, match="no MLflow experiment named 'no-such'"):
        run_reeval(parse_args(["--experiment", "no-such", "--no-ray"]))
    with pytest.raises(ValueError, match="experiment .* or run ids"):
        run_reeval(parse_args(["--no-ray"]))
    with pytest.raises(ValueError, match="first_k must be at least 1"):
        parse_args(["--experiment", "x", "--first-k", "0"])
    with pytest.raises(Exception, match="unknown capability profile 'laptop'"):
        parse_args(["--experiment", "x", "--capability", "laptop"])


def test_reeval_progress_counts_snapshots_per_run_and_tells_runs_of_one_name_apart():
    from pipelines.reeval import Job, job_progress

    def job(run_id, name, step):
        return Job(run_id, name, "tiny-llama", {}, f"snapshots/edits-{step}.safetensors",
                   step, retention=True, tasks=[])

    jobs = [job("a" * 32, "stream", 4), job("a" * 32, "stream", 6), job("b" * 32, "stream", 6),
            job("c" * 32, "grid-cell", 6)]
    progress, labels = job_progress(jobs)
    assert labels == {"a" * 32: "stream (aaaaaaaa)", "b" * 32: "stream (bbbbbbbb)",
                      "c" * 32: "grid-cell"}
    assert progress.totals == {"stream (aaaaaaaa)": 2, "stream (bbbbbbbb)": 1, "grid-cell": 1}
    assert progress.line() == "reeval: 0/3 runs done, 0/4 snapshots; 3 waiting; estimating…"
