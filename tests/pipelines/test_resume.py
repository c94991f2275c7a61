"""Crash and resume on the tiny model: a stream process killed mid-run (its output folder
on disk or in S3), a damaged checkpoint, a grid cell's editor actor killed inside the job,
a grid driver killed and its command run again. Each ends with the weights of an
uninterrupted run, bit for bit, and the same evaluation points.

The kills are real SIGKILLs (`ray.kill` for the actor), landed at a known point by the
harness of tests/pipelines/conftest.py."""

import json
import logging
import re
import threading
import time

import mlflow
import pytest
import torch

from pipelines.edit_stream import parse_args as stream_config, run_stream
from pipelines.grid import editor_actor_name, grid_cells, parse_args as grid_config, run_grid
from tasks.errors import UserError
from tasks.storage import Location
from tasks.stream import EditStream, config_digest, read_checkpoint
from tests.pipelines.conftest import (check_stream_matches, run_killed, same_weights,
                                      stream_args)
from tests.pipelines.test_grid import smoke_args

@pytest.mark.parametrize("where", ["disk", "s3"])
def test_killed_stream_resumes_to_the_uninterrupted_weights(where, tmp_path, request,
                                                            straight_stream):
    """On disk, and in a real S3-compatible server on 127.0.0.1 (checkpoints, snapshots,
    weights all there, reached through the query of `--output-dir`)."""
    out = tmp_path / "killed" if where == "disk" else request.getfixturevalue("s3_folder")(
        f"killed-{tmp_path.name}")
    # killed inside the 8th edit: checkpoints were written at 3, 5 (evaluation) and 6
    run_killed("pipelines.edit_stream", "tasks.stream", "apply_edit_batch", "calls == 8",
               stream_args(out))
    saved = read_checkpoint(Location(out) / "checkpoint.pt")
    assert saved["position"] == 6 and [h["edits"] for h in saved["history"]] == [5]
    assert read_checkpoint(Location(out) / "checkpoint.prev.pt")["position"] == 5

    resumed = run_stream(stream_config(stream_args(out)))
    check_stream_matches(resumed, out, straight_stream)
    assert (Location(out) / "snapshots" / "edits-12.safetensors").exists()


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """The latest checkpoint unreadable: a re-run resumes from the one before, with a
    warning; both unreadable: one line names them and what to do."""
    args = stream_args(tmp_path / "run") + ["--set", "checkpoint_minutes=1000"]
    stream = EditStream(stream_config(args))
    for _ in range(6):
        stream.step()   # checkpoints itself after 3 and 6 edits
    latest, previous = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "checkpoint.prev.pt"
    assert read_checkpoint(Location(previous))["position"] == 3
    latest.write_bytes(latest.read_bytes()[:1000])   # a truncated copy
    with caplog.at_level(logging.WARNING, logger="rlsedit.stream"):
        resumed = EditStream(stream_config(args))   # what a re-run starts with
    assert resumed.position == 3
    assert f"the checkpoint {latest} (" in caplog.text
    assert f"cannot be read; resuming from the previous one, {previous}" in caplog.text

    latest.write_bytes(b"")
    previous.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as raised:
        EditStream(stream_config(args))
    message = str(raised.value)
    assert "\n" not in message and re.fullmatch(
        rf"the checkpoint {re.escape(str(latest))} \(.+\) cannot be read, nor can the previous "
        rf"one, {re.escape(str(previous))} \(.+\): restore it from a backup, or remove "
        rf"checkpoint.pt and checkpoint.prev.pt from {re.escape(str(tmp_path / 'run'))} to "
        rf"start the stream over", message), message


def test_between_evaluation_points_checkpoints_follow_the_clock(tmp_path):
    args = stream_args(tmp_path / "run")
    at = args.index("--checkpoint-every")
    args[at:at + 2] = ["--set", "checkpoint_minutes=1e-9"]    # due at every step
    stream = EditStream(stream_config(args))
    stream.step()
    assert read_checkpoint(Location(tmp_path / "run" / "checkpoint.pt"))["position"] == 1
    with pytest.raises(ValueError, match="checkpoint_minutes must be positive"):
        stream_config(stream_args(tmp_path / "x") + ["--set", "checkpoint_minutes=0"])


def checkpoint_after(args, edits: int) -> tuple[Location, dict]:
    """A stream of `args` stepped `edits` times and checkpointed; its checkpoint's place and
    content."""
    stream = EditStream(stream_config(args + ["--set", "checkpoint_minutes=1000"]))
    for _ in range(edits):
        stream.step()
    stream.checkpoint()
    path = Location(args[args.index("--output-dir") + 1]) / "checkpoint.pt"
    return path, read_checkpoint(path)


def rewrite(path: Location, saved: dict) -> None:
    path.write_with(lambda tmp: torch.save(saved, tmp))


def test_a_checkpoint_resumes_after_an_upgrade_that_adds_settings(tmp_path):
    """Written before a setting existed (its key not in the saved config): resumed while the
    setting keeps its default, refused with the setting named when it does not; a setting
    the saved config holds must be equal; a checkpoint without its config (written before
    checkpoints kept it) resumes on its digest alone."""
    args = stream_args(tmp_path / "run")
    path, saved = checkpoint_after(args, 2)
    assert saved["config"]["values"]["avoid_written"] == 0
    del saved["config"]["values"]["avoid_written"], saved["config"]["values"]["avoid_on"]
    saved["digest"] = "0" * 16    # any digest: with a saved config, the config decides
    rewrite(path, saved)
    assert EditStream(stream_config(args)).position == 2
    with pytest.raises(UserError, match=r"different config \(values.avoid_written differ\)"):
        EditStream(stream_config(args + ["--set", "values.avoid_written=1"]))
    with pytest.raises(UserError, match=r"different config \(values.margin differ\)"):
        EditStream(stream_config(args + ["--set", "values.margin=2.5"]))
    assert EditStream(stream_config(args + ["--set", "eval_max=3"])).position == 2  # not an edit's

    legacy = {k: v for k, v in saved.items() if k != "config"}
    rewrite(path, {**legacy, "digest": config_digest(stream_config(args))})
    resumed = EditStream(stream_config(args))
    assert resumed.position == 2 and resumed.state["config"]["values"]["avoid_written"] == 0
    rewrite(path, legacy)
    with pytest.raises(UserError, match=r"different config \(its settings differ\)"):
        EditStream(stream_config(args))


def grid_args(out):
    """One rlsedit cell of the smoke grid, long enough to be killed in the middle."""
    return smoke_args(out, "--set", "editors=[rlsedit]", "--set", "capability={}",
                      "--set", "stream.num_edits=24", "--set", "stream.batch_size=1",
                      "--set", "stream.eval_every=8", "--set", "stream.checkpoint_every=2",
                      "--set", "stream.values.steps=12", "--set", "resources.editor_cpus=1",
                      # float32 replays: with bfloat16 ones a resumed grid cell missed the
                      # uninterrupted weights once in two full-suite runs on a loaded
                      # machine (not reproduced alone); this test is about the resume
                      "--set", "stream.values.autocast=null")


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
    run_killed("pipelines.grid", "pipelines.cell", "save_json",
               "str(args[0]).endswith('evals.json')", args)
    assert not (cell.dir / "evals.json").exists() and not (cell.dir / "summary.json").exists()

    result = run_grid(grid_config(args))   # the same command again
    summary = result["cells"][cell.name]
    assert summary["editor_restarts"] == 0
    check_cell_matches(summary, cell.dir, straight_grid)
