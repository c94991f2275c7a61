"""Crash and resume on the tiny model: a stream process killed mid-run, a grid cell's editor
actor killed inside the job, a grid driver killed and its command run again. Each ends with
the weights of an uninterrupted run, bit for bit, and the same evaluation points.

The kills are real SIGKILLs (`ray.kill` for the actor). To land them at a known point, the
killed processes run through a small harness that patches one function to kill its own
process on the n-th call; nothing in the project knows about it."""

import json
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipelines.edit_stream import parse_args as stream_config, run_stream
from pipelines.grid import editor_actor_name, grid_cells, parse_args as grid_config, run_grid
from tasks.stream import EditStream
from tests.conftest import CORPUS, EDIT_DATA, ROOT
from tests.pipelines.test_grid import smoke_args

HARNESS = """
import os, signal, sys
import {module} as target
original, calls = target.{function}, 0
def dying(*args, **kwargs):
    global calls
    calls += 1
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
target.{function} = dying
from {main_module} import main
main(sys.argv[1:])
"""


def run_killed(main_module: str, module: str, function: str, condition: str, args: list[str]):
    """Run `python -m main_module args`, SIGKILLed by itself when `condition` holds at a call
    of `module.function` (`calls` counts them)."""
    code = HARNESS.format(module=module, function=function, condition=condition,
                          main_module=main_module)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def same_weights(a, b) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def stream_args(out):
    return ["--model", "tiny-llama", "--data", str(EDIT_DATA), "--num-edits", "12",
            "--batch-size", "1", "--eval-every", "5", "--checkpoint-every", "3",
            "--output-dir", str(out), "--set", f"anchor.corpus={CORPUS}",
            "--set", "anchor.n_texts=20", "--set", "values.steps=4",
            "--set", "values.n_prefixes=1", "--set", "fluency_samples=0"]


def test_killed_stream_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = run_stream(stream_config(stream_args(tmp_path / "straight")))

    # killed inside the 8th edit: checkpoints were written at 3, 5 (evaluation) and 6
    run_killed("pipelines.edit_stream", "tasks.stream", "apply_edit_batch", "calls == 8",
               stream_args(tmp_path / "killed"))
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert saved["position"] == 6 and [h["edits"] for h in saved["history"]] == [5]

    resumed = run_stream(stream_config(stream_args(tmp_path / "killed")))
    assert same_weights(tmp_path / "killed" / "edited_layers.safetensors",
                        tmp_path / "straight" / "edited_layers.safetensors")
    assert [h["edits"] for h in resumed["history"]] == [5, 10, 12]
    for got, want in zip(resumed["history"], reference["history"]):
        assert got["efficacy"] == want["efficacy"]
        assert got["update_norm_L1"] == want["update_norm_L1"]
    client = mlflow.MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "efficacy"))
    assert steps == [5, 10, 12], "one MLflow run goes on across the crash"


def test_between_evaluation_points_checkpoints_follow_the_clock(tmp_path):
    args = stream_args(tmp_path / "run")
    at = args.index("--checkpoint-every")
    args[at:at + 2] = ["--set", "checkpoint_minutes=1e-9"]    # due at every step
    stream = EditStream(stream_config(args))
    stream.step()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["position"] == 1
    with pytest.raises(ValueError, match="checkpoint_minutes must be positive"):
        stream_config(stream_args(tmp_path / "x") + ["--set", "checkpoint_minutes=0"])


def grid_args(out):
    """One rlsedit cell of the smoke grid, long enough to be killed in the middle."""
    return smoke_args(out, "--set", "editors=[rlsedit]", "--set", "capability={}",
                      "--set", "stream.num_edits=24", "--set", "stream.batch_size=1",
                      "--set", "stream.eval_every=8", "--set", "stream.checkpoint_every=2",
                      "--set", "stream.values.steps=12", "--set", "resources.editor_cpus=1")


@pytest.fixture(scope="module")
def straight_grid(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("straight")
    cfg = grid_config(grid_args(out))
    (cell,) = grid_cells(cfg)
    return run_grid(cfg)["cells"][cell.name], cell.dir


def check_cell_matches(summary: dict, cell_dir, straight_grid) -> None:
    reference, reference_dir = straight_grid
    assert same_weights(cell_dir / "edited_layers.safetensors",
                        reference_dir / "edited_layers.safetensors")
    assert [h["edits"] for h in summary["history"]] == [8, 16, 24]
    for got, want in zip(summary["history"], reference["history"]):
        assert got["efficacy"] == want["efficacy"] and got["perplexity"] == want["perplexity"]
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(
        summary["mlflow_run_id"], "efficacy"))
    assert steps == [8, 16, 24]


def test_killed_editor_actor_restarts_inside_the_job(local_ray, tmp_path, straight_grid):
    cfg = grid_config(grid_args(tmp_path))
    (cell,) = grid_cells(cfg)
    results = []
    driver = threading.Thread(target=lambda: results.append(run_grid(cfg)))
    driver.start()
    checkpoint, deadline = cell.dir / "checkpoint.pt", time.monotonic() + 300
    while not (checkpoint.exists()
               and torch.load(checkpoint, weights_only=False)["position"] >= 10):
        assert time.monotonic() < deadline and driver.is_alive(), "the cell never got going"
        time.sleep(0.05)
    parent = json.loads((tmp_path / "grid" / "grid_state.json").read_text())["parent"]
    local_ray.kill(local_ray.get_actor(editor_actor_name(parent, cell)), no_restart=False)
    driver.join(timeout=600)
    summary = results[0]["cells"][cell.name]
    assert summary["editor_restarts"] == 1, "the kill landed after the stream had finished"
    check_cell_matches(summary, cell.dir, straight_grid)


def test_killed_grid_driver_resumes_when_its_command_runs_again(local_ray, tmp_path,
                                                                 straight_grid):
    args = grid_args(tmp_path)
    (cell,) = grid_cells(grid_config(args))
    # the driver dies as it saves the first evaluation's results; its local Ray goes with it
    run_killed("pipelines.grid", "pipelines.grid", "_save_json",
               "str(args[0]).endswith('evals.json')", args)
    assert not (cell.dir / "evals.json").exists() and not (cell.dir / "summary.json").exists()

    result = run_grid(grid_config(args))   # the same command again
    summary = result["cells"][cell.name]
    assert summary["editor_restarts"] == 0
    check_cell_matches(summary, cell.dir, straight_grid)
