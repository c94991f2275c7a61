"""A user's mistake is one line: each class of them (data, config, names, paths, devices,
checkpoints, tracking server, Ray cluster) run against the real drivers as a user runs
them ends with status 2 and one `error:` line on stderr, no traceback, and nothing
written (no run folder, no tracking store, no MLflow run); `--debug` shows the traceback.
Most run `main(argv)` in this process, to keep the suite fast; one runs the command."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from pipelines import edit_stream, grid
from tests.conftest import EDIT_DATA, ROOT
from tests.pipelines.test_edit_stream import tiny_args
from tests.pipelines.test_grid import smoke_args


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking store of this test's own, which must not come to exist."""
    path = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    return path


def one_line(capsys, main, argv, alone: bool = True) -> str:
    """The `error:` line `main(argv)` stops with, status 2, no traceback. `alone`: it is all
    of stderr (a mistake found before any work); else it ends stderr (after the log and
    progress bars of the work done before the mistake showed)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stopped.value.code == 2 and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert len(lines) == 1 or not alone, err
    return lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(n: int = 6) -> list[dict]:
    return json.loads(EDIT_DATA.read_text())[:n]


def data_file(tmp_path, name: str, content) -> str:
    """`content` (bytes, text, or records as JSON) written to `name`; its path."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def long_prompt(n_chars: int) -> list[dict]:
    first = dict(records()[0])
    first["prompt"] = "x" * n_chars + " " + first["prompt"]
    return [first] + records()[1:]


DATA_MISTAKES = {   # name: (file content, or None for no file; what the line says)
    "missing": (None, r"cannot read edit data .*: no such file or directory; give --data"),
    "not UTF-8": (json.dumps(records(), ensure_ascii=False).replace(
        records()[0]["subject"], records()[0]["subject"] + " Café", 1).encode("latin-1"),
                  r"is not UTF-8 text \(byte [\d,]+ is 0xe9\): save it as UTF-8"),
    "not JSON": ("case_id,prompt\n1,The capital of\n", "neither a JSON list nor JSON lines"),
    "a field missing": ([{k: v for k, v in r.items() if k != "target_new"} for r in records()],
                        r"record 0 \(case_id=\d+\): missing or malformed field 'target_new'"),
    "a 20,000-character prompt": (long_prompt(20_000), r"record 0 \(case_id=\d+\): prompt is "
                                  r"20,\d{3} characters long, over the limit of 1,000: .* "
                                  r"--set max_text_chars=N"),
    "fewer records than num_edits": (records(3), r"asked for 6 records from offset 0, but it "
                                     r"holds only 3 .*: lower num_edits"),
}


@pytest.mark.parametrize("mistake", DATA_MISTAKES)
def test_bad_edit_data_is_one_line_before_anything_is_written(mistake, tmp_path, store, capsys):
    content, says = DATA_MISTAKES[mistake]
    path = (str(tmp_path / "nope.json") if content is None
            else data_file(tmp_path, "edits.json", content))
    line = one_line(capsys, edit_stream.main, tiny_args(tmp_path, "--data", path))
    assert re.search(says, line), line
    assert not (tmp_path / "run").exists() and not store.exists()


def test_the_length_cap_is_a_setting(tmp_path):
    path = data_file(tmp_path, "edits.json", long_prompt(1_500))
    cfg = edit_stream.parse_args(tiny_args(tmp_path, "--data", path,
                                           "--set", "max_text_chars=2000"))
    from tasks.preflight import check_stream

    check_stream(cfg)   # the longer prompt is accepted under a higher cap


def config_file(tmp_path, text: str) -> str:
    return data_file(tmp_path, "config.yaml", text)


CONFIG_MISTAKES = {   # name: (extra argv given tmp_path, what the line says)
    "a config file that is not there": (lambda t: ["--config", str(t / "nope.yaml")],
                                        r"cannot read config file .*nope.yaml: no such file"),
    "a YAML syntax error": (lambda t: ["--config", config_file(t, "num_edits: [6\n")],
                            r"config file .* is not valid YAML: .* at line 2, column 1"),
    "a config that is a list": (lambda t: ["--config", config_file(t, "- model\n")],
                                "must hold a mapping at the top level"),
    "an unknown key": (lambda t: ["--set", "num_edit=5"], r"unknown config key\(s\) num_edit;"),
    "a value of the wrong type": (lambda t: ["--set", "editor_args.mu=high"],
                                  "config key editor_args.mu must be float, got 'high'"),
    "an override without =": (lambda t: ["--set", "batch_size"], "must look like key.sub=value"),
    "a flag that is not a number": (lambda t: ["--num-edits", "ten"],
                                    "config key num_edits must be int, got 'ten'"),
    "a number out of range": (lambda t: ["--num-edits", "0"], "num_edits must be at least 1"),
    "layers that are not numbers": (lambda t: ["--layers", "six"],
                                    r"config key layers\[0\] must be int, got 'six'"),
    "an unknown flag": (lambda t: ["--num-edtis", "5"],
                        r"unrecognized arguments: --num-edtis 5 "
                        r"\(see python -m pipelines.edit_stream --help\)"),
    "an unknown model": (lambda t: ["--model", "smollm-135m"],
                         r"unknown model 'smollm-135m': use one of \["),
    "an unknown editor": (lambda t: ["--editor", "rls"], r"unknown editor 'rls': choose one of"),
    "an unknown editor setting": (lambda t: ["--set", "editor_args.muu=1"],
                                  r"unknown config key\(s\) editor_args.muu"),
    "a layer the model lacks": (lambda t: ["--layers", "9"],
                                r"edit layers \[9\] are not valid for model 'tiny-llama', "
                                r"which has layers 0..3"),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_config_and_name_mistakes_are_one_line(mistake, tmp_path, store, capsys):
    extra, says = CONFIG_MISTAKES[mistake]
    line = one_line(capsys, edit_stream.main, tiny_args(tmp_path, *extra(tmp_path)))
    assert re.search(says, line), line
    assert not (tmp_path / "run").exists() and not store.exists()


PLACE_MISTAKES = {   # name: (extra argv, environment, given tmp_path; what the line says)
    "an output folder under a file": (
        lambda t: ["--output-dir", str(t / "afile" / "run")], lambda t: {},
        r"cannot write the output folder .*afile/run: .*afile is a file, not a folder; "
        r"give another output_dir"),
    "an anchor corpus that is not there": (
        lambda t: ["--set", f"anchor.corpus={t / 'nope.tsv'}"], lambda t: {},
        r"cannot read anchor corpus .*nope.tsv: no such file .*; set anchor.corpus"),
    "an unknown device": (lambda t: ["--device", "gpu"], lambda t: {},
                          r"unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
    "a tracking server that is not there": (
        lambda t: [], lambda t: {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        r"the MLflow tracking server http://127.0.0.1:\d+ \(MLFLOW_TRACKING_URI\) cannot be "
        r"reached \(.*Connection refused\): start it"),
    "a tracking URI of an unknown scheme": (
        lambda t: [], lambda t: {"MLFLOW_TRACKING_URI": "mlflw://localhost:5000"},
        r"has an unknown scheme 'mlflw': set MLFLOW_TRACKING_URI to sqlite:///PATH"),
    "a tracking store under a file": (
        lambda t: [], lambda t: {"MLFLOW_TRACKING_URI": f"sqlite:///{t / 'afile' / 'mlflow.db'}"},
        r"cannot write the MLflow tracking store .*afile/mlflow.db: .*afile is a file"),
}


@pytest.mark.parametrize("mistake", PLACE_MISTAKES)
def test_paths_devices_and_tracking_mistakes_are_one_line(mistake, tmp_path, store, capsys,
                                                          monkeypatch):
    extra, env, says = PLACE_MISTAKES[mistake]
    (tmp_path / "afile").write_text("a file, not a folder")
    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    line = one_line(capsys, edit_stream.main, tiny_args(tmp_path, *extra(tmp_path)))
    assert re.search(says, line), line
    assert not (tmp_path / "run").exists() and not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA device")
def test_cuda_without_a_cuda_device_is_one_line(tmp_path, store, capsys):
    line = one_line(capsys, edit_stream.main, tiny_args(tmp_path, "--device", "cuda"))
    assert line.startswith("error: device 'cuda': no CUDA device is visible to this torch")
    assert "use --device cpu" in line
    assert not (tmp_path / "run").exists() and not store.exists()


CHECKPOINT_MISTAKES = {   # name: (write the checkpoint there, what the line says)
    "damaged": (lambda path: path.write_bytes(b"PK\x03\x04 not a zip file"),
                r"the checkpoint .*checkpoint.pt \(.*\) cannot be read: restore it"),
    "of another config": (lambda path: torch.save({"digest": "0" * 16}, path),
                          r"checkpoint.pt was written by a different config \(its settings "
                          r"differ\); remove it or choose another output_dir"),
}


@pytest.mark.parametrize("mistake", CHECKPOINT_MISTAKES)
def test_a_checkpoint_that_cannot_go_on_is_one_line_and_nothing_is_logged(mistake, tmp_path,
                                                                         store, capsys):
    """Found once the model is loaded, after its log lines: the error line ends stderr."""
    write, says = CHECKPOINT_MISTAKES[mistake]
    run = tmp_path / "run"
    run.mkdir()
    write(run / "checkpoint.pt")
    line = one_line(capsys, edit_stream.main, tiny_args(tmp_path), alone=False)
    assert re.search(says, line), line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"] and not store.exists()


GRID_MISTAKES = {   # name: (the smoke grid's --set overrides given tmp_path, what the line says)
    "an unknown model": (lambda t: ["models=[gpt-9]"], "unknown model 'gpt-9'"),
    "an unknown editor": (lambda t: ["editors=[rls]"], "unknown editor 'rls'"),
    "a bad variant": (lambda t: ["editors=[bad]", "variants.bad={mu: 3}"],
                      "variant 'bad' needs `editor`"),
    "edit data that is not there": (lambda t: [f"stream.data={t / 'nope.json'}"],
                                    r"cannot read edit data .*nope.json: no such file"),
    "more edits than the data holds": (
        lambda t: ["stream.num_edits=20000"],
        r"asked for 20000 records from offset 0, but it holds only 10000"),
    "a held-out corpus that is not there": (lambda t: [f"heldout.corpus={t / 'nope.tsv'}"],
                                            r"cannot read held-out corpus .*nope.tsv"),
    "a Ray cluster that is not there": (
        lambda t: [f"ray_address=127.0.0.1:{free_port()}"],
        r"the Ray cluster at [\d.]+:\d+ cannot be reached .*set ray_address=local"),
    "more CPUs than the machine has": (
        lambda t: ["resources.editor_cpus=512"],
        r"the cluster has \d+ CPUs; evaluators take 0.5 and an editor needs 512.0: lower"),
}


@pytest.mark.parametrize("mistake", GRID_MISTAKES)
def test_grid_mistakes_are_one_line_before_anything_is_written(mistake, tmp_path, store,
                                                              capsys):
    overrides, says = GRID_MISTAKES[mistake]
    sets = [arg for value in overrides(tmp_path) for arg in ("--set", value)]
    line = one_line(capsys, grid.main, smoke_args(tmp_path, *sets))
    assert re.search(says, line), line
    assert not (tmp_path / "grid").exists() and not store.exists()


def test_a_grid_without_config_or_tracking_server_is_one_line(tmp_path, store, capsys,
                                                              monkeypatch):
    line = one_line(capsys, grid.main, [])
    assert line == ("error: the following arguments are required: --config "
                    "(see python -m pipelines.grid --help)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    line = one_line(capsys, grid.main, smoke_args(tmp_path))
    assert re.search(r"the MLflow tracking server http://127.0.0.1:\d+ .* cannot be reached",
                     line), line
    assert not (tmp_path / "grid").exists() and not store.exists()


def run_command(tmp_path, module: str, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_command_says_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = tiny_args(tmp_path, "--data", str(tmp_path / "nope.json"))
    refused = run_command(tmp_path, "pipelines.edit_stream", *argv)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: cannot read edit data {tmp_path / 'nope.json'}: no such file or directory; "
        f"give --data (or data:) a CounterFact JSON or JSON-lines file, or hub:NAME[:SPLIT]"]
    debug = run_command(tmp_path, "pipelines.edit_stream", *argv, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(
        "tasks.errors.UserError: cannot read edit data")
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_user_error_raised_in_a_ray_task_is_its_own_line(capsys):
    """Ray re-raises a task's exception as a RayTaskError that is also of the task's
    exception class, its message the remote traceback, the original as `cause`."""
    from pipelines.driver import one_line_errors
    from tasks.errors import UserError

    class RemoteError(UserError):   # what ray.get raises for a task that raised UserError
        cause = UserError("edit data x.json: record 3 ...: shorten it")

        def __str__(self):
            return "ray::Evaluator.baseline() (pid=1, ip=10.0.0.1)\n  File ...\nUserError: ..."

    with pytest.raises(SystemExit):
        with one_line_errors([]):
            raise RemoteError()
    assert capsys.readouterr().err == "error: edit data x.json: record 3 ...: shorten it\n"


def test_a_tracking_server_must_answer_its_health_check(monkeypatch):
    """An MLflow server answers `/health` with 200; another server (a proxy's 404) or one
    that wants credentials is named before anything is logged."""
    import http.server
    import threading

    from pipelines.tracking import check_tracking
    from tasks.errors import UserError

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response({"/health": 200, "/auth/health": 401}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        check_tracking()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{base}/auth")
        with pytest.raises(UserError, match=r"refuses access \(HTTP 401\): set MLFLOW_TRACKING_"):
            check_tracking()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{base}/other")
        with pytest.raises(UserError, match=r"does not answer as an MLflow server \(HTTP 404"):
            check_tracking()
    finally:
        server.shutdown()


def test_a_quoted_library_error_is_one_line_cut_at_a_word():
    from tasks.errors import brief

    err = RuntimeError("PytorchStreamReader failed\n  reading zip archive: failed finding")
    assert brief(err) == "PytorchStreamReader failed reading zip archive: failed finding"
    assert brief(err, 40) == "PytorchStreamReader failed reading zip …"
