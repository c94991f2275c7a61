"""What the drivers do around their work, on real parts: a fresh SQLite store created by
several processes at once, a dead Ray address reported in one line within seconds, one
driver per output folder (and one reeval per store), state from before stores were
recorded. (Resuming in another tracking store: test_grid.py and test_edit_stream.py; a
live cluster answers: test_grid.py.)"""

import logging
import os
import re
import socket
import subprocess
import sys
import time

import mlflow
import pytest

from pipelines.driver import UserError, join_ray, no_answer
from pipelines.tracking import check_store, tracking_store
from tasks.lock import LOCK_NAME
from tests.conftest import ROOT
from tests.pipelines.test_edit_stream import tiny_args
from tests.pipelines.test_grid import smoke_args
from tests.test_lock import hold

STARTER = """
import pathlib, sys, time
import mlflow
from pipelines.tracking import open_tracking
go = pathlib.Path(sys.argv[1])
(go.parent / f"ready-{sys.argv[2]}").touch()
while not go.exists():
    time.sleep(0.005)
open_tracking("together")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
"""


def free_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_started_together_create_a_fresh_store_once(tmp_path):
    """Without the creation lock, all but one of these fail with 'duplicate column' or
    'table already exists' (on this project's machine)."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    go = tmp_path / "go"
    starters = [subprocess.Popen([sys.executable, "-c", STARTER, str(go), str(i)], cwd=ROOT,
                                 env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    while len(list(tmp_path.glob("ready-*"))) < 3:   # all imported: start them at once
        assert all(s.poll() is None for s in starters), starters[0].communicate()[1]
        time.sleep(0.05)
    go.touch()
    errors = [s.communicate(timeout=300)[1] for s in starters]   # slow on a loaded machine
    assert [s.returncode for s in starters] == [0] * 3, errors
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("together")
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_a_dead_ray_address_stops_the_grid_in_one_line(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": dead}
    tic = time.perf_counter()
    grid = subprocess.run([sys.executable, "-m", "pipelines.grid", *smoke_args(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    # about 7 s alone (imports included); the bound leaves room for a loaded machine,
    # where Ray would retry the dead address for ever
    assert time.perf_counter() - tic < 180
    assert grid.returncode == 2 and "Traceback" not in grid.stderr
    line = grid.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the Ray cluster at ") and f":{dead.split(':')[1]} " in line
    assert "`ray stop`" in line and "RAY_ADDRESS=local" in line


def test_a_silent_or_configured_dead_cluster_is_named_within_the_bound():
    with socket.socket() as silent:   # accepts connections, never speaks gRPC: a frozen head
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        tic = time.perf_counter()
        assert "does not answer within 1 s" in no_answer(
            f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)
        assert time.perf_counter() - tic < 5
    with pytest.raises(UserError, match="cannot be reached .* set ray_address=local"):
        join_ray(f"127.0.0.1:{free_port()}")   # a config's ray_address, not RAY_ADDRESS


@pytest.mark.parametrize("driver", ["edit_stream", "grid", "reeval"])
def test_a_second_driver_is_refused_at_once_in_one_line(driver, tmp_path, capsys):
    """Each driver, while another process holds its lock: the stream's or the grid's
    output folder, or reeval's lock for the tracking store."""
    from pipelines import edit_stream, grid, reeval

    if driver == "reeval":
        path, argv = reeval.lock_path(tracking_store()), ["--run-id", "x", "--no-ray"]
        busy = f"re-evaluation of {tracking_store()}"
    else:
        folder = tmp_path / ("run" if driver == "edit_stream" else "grid")
        path, busy = folder / LOCK_NAME, f"output folder {folder}"
        argv = tiny_args(tmp_path) if driver == "edit_stream" else smoke_args(tmp_path)
    holder = hold(path)
    try:
        tic = time.perf_counter()
        with pytest.raises(SystemExit) as stopped:
            {"edit_stream": edit_stream, "grid": grid, "reeval": reeval}[driver].main(argv)
        assert time.perf_counter() - tic < 5, "refused before any work"
        assert stopped.value.code == 2
        assert re.fullmatch(rf"error: {re.escape(busy)} is busy: pid {holder.pid} on .*\n",
                            capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_resumes_only_in_the_store_that_holds_it(tmp_path, monkeypatch):
    from pipelines.tracking import open_tracking

    run_id = mlflow.MlflowClient().create_run(open_tracking("stores").experiment_id).info.run_id
    store = tracking_store()
    state = {}   # resume state from before stores were recorded: the run is looked up
    check_store(state, run_id, tmp_path)
    assert state == {"tracking_store": store}
    with pytest.raises(UserError, match=f"holds MLflow run {'0' * 32}, which the tracking "
                                        f"store {store} does not have"):
        check_store({}, "0" * 32, tmp_path)
    elsewhere = {"tracking_store": "sqlite:////elsewhere/mlflow.db"}
    with pytest.raises(UserError, match="set MLFLOW_TRACKING_URI=sqlite:////elsewhere/mlflow.db "
                                        "to go on there, or give a new output_dir"):
        check_store(elsewhere, run_id, tmp_path)
    check_store(elsewhere, None, tmp_path)   # nothing logged yet: any store will do

    monkeypatch.chdir(tmp_path)   # one store, one name, whatever the current folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert tracking_store() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_experiments_are_marked_as_model_training_unless_they_have_a_kind():
    from pipelines.tracking import open_tracking

    client = mlflow.MlflowClient()
    assert open_tracking("kinded").tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    open_tracking("chosen")   # a kind the user set stays
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_library_chatter_is_dropped_and_everything_else_of_its_loggers_kept(caplog):
    from pipelines.driver import setup_logging

    setup_logging()
    caplog.set_level(logging.INFO)
    ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    ray_auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=…")
    ray_auth.warning("Token authentication is disabled for this Ray cluster. Anyone with …")
    db = logging.getLogger("mlflow.store.db.utils")
    db.info("Creating initial MLflow database tables...")
    db.error("Something else went wrong")
    assert [r.getMessage() for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster. Anyone with …",
        "Something else went wrong"]


def test_the_closing_message_names_the_chart_view_of_the_experiment():
    from pipelines.tracking import how_to_open, open_tracking

    experiment = open_tracking("closing")
    run_id = mlflow.MlflowClient().create_run(experiment.experiment_id).info.run_id
    server, page = how_to_open(run_id).splitlines()
    assert server == f"open it with: mlflow ui --backend-store-uri {tracking_store()}"
    assert page == (f"its charts: http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
                    f"/runs?workflowType=machine_learning&compareRunsMode=CHART")
