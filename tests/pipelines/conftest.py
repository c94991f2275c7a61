"""What the crash-and-resume tests share: the stream they kill, a harness that SIGKILLs a
driver at a known point, the uninterrupted run they are compared with.

The harness patches one function of the killed process to kill that process on the n-th
call; nothing in the project knows about it."""

import signal
import subprocess
import sys

import mlflow
import pytest
import torch
from safetensors.torch import load

from pipelines.edit_stream import parse_args as stream_config, run_stream
from tasks.storage import Location
from tests.conftest import CORPUS, EDIT_DATA, ROOT

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
    """Whether two safetensors files (local paths or URIs) hold equal tensors."""
    left, right = (load(Location(path).read_bytes()) for path in (a, b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def stream_args(out):
    """A 12-edit stream of the tiny model: evaluated at 5, 10 and 12 edits, checkpointed
    every 3 edits and at each evaluation, into `out` (a path or a URI)."""
    return ["--model", "tiny-llama", "--data", str(EDIT_DATA), "--num-edits", "12",
            "--batch-size", "1", "--eval-every", "5", "--checkpoint-every", "3",
            "--output-dir", str(out), "--set", f"anchor.corpus={CORPUS}",
            "--set", "anchor.n_texts=20", "--set", "values.steps=4",
            "--set", "values.n_prefixes=1", "--set", "fluency_samples=0"]


def fresh_process_threads() -> int:
    """The torch thread count a new Python process starts with here: what the killed and
    the resuming drivers run at."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout)


@pytest.fixture(scope="session")
def straight_stream(tmp_path_factory):
    """The summary and output folder of the `stream_args` stream run without a break, at
    the thread count of the drivers it is compared with (whatever an earlier test left)."""
    out = tmp_path_factory.mktemp("straight-stream")
    before = torch.get_num_threads()
    torch.set_num_threads(fresh_process_threads())
    try:
        return run_stream(stream_config(stream_args(out))), out
    finally:
        torch.set_num_threads(before)


def check_stream_matches(summary: dict, out, straight_stream) -> None:
    """A resumed `stream_args` stream ended as the straight one: the same weights, bit for
    bit, the same evaluation points and scores, one MLflow run across the break."""
    reference, reference_dir = straight_stream
    assert same_weights(Location(out) / "edited_layers.safetensors",
                        reference_dir / "edited_layers.safetensors")
    assert [h["edits"] for h in summary["history"]] == [5, 10, 12]
    for got, want in zip(summary["history"], reference["history"]):
        assert got["efficacy"] == want["efficacy"]
        assert got["update_norm_L1"] == want["update_norm_L1"]
    client = mlflow.MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "efficacy"))
    assert steps == [5, 10, 12], "one MLflow run goes on across the crash"
