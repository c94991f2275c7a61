"""One path for every run (issue 17): the refactors behind it change no edit.

`tests/data/golden/*.safetensors` hold the final edited layers of three 20-edit streams on
the tiny models, written by the code before the refactor (commit cbc1ff0) with one torch
thread on an AVX2 CPU. A stream run now must end with the same weights, bit for bit, on
such a CPU; other CPUs take other matmul kernels, so there the weights must agree to
float rounding (a relative 1e-5)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.edit_stream import parse_args as stream_config, run_stream
from tests.conftest import CORPUS, EDIT_DATA

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
GOLDEN_CPU = "AVX2"   # torch.backends.cpu.get_cpu_capability() where they were written
STREAMS = {  # name: (model, editor, layers)
    "tiny-llama-rlsedit": ("tiny-llama", "rlsedit", "1"),
    "tiny-gemma3-rlsedit": ("tiny-gemma3", "rlsedit", "0,1"),
    "tiny-llama-memit": ("tiny-llama", "memit", "1"),
}


def golden_args(name: str, out) -> list[str]:
    """The 20-edit stream the golden weights of `name` came from, into `out`."""
    model, editor, layers = STREAMS[name]
    return ["--model", model, "--editor", editor, "--layers", layers,
            "--data", str(EDIT_DATA), "--num-edits", "20", "--batch-size", "5",
            "--eval-every", "20", "--output-dir", str(out),
            "--set", f"anchor.corpus={CORPUS}", "--set", "anchor.n_texts=20",
            "--set", "values.steps=4", "--set", "values.n_prefixes=1",
            # the settings the golden runs had: mean keys, the NLL stop, float32 replays
            "--set", "keys.mode=mean",
            "--set", "values.stop_on=nll", "--set", "values.autocast=null",
            "--set", "fluency_samples=0"]


@pytest.fixture
def one_thread():
    """The golden runs' thread count; `torch_threads_as_found` puts it back after."""
    torch.set_num_threads(1)


def assert_golden(name: str, weights_file) -> None:
    """The safetensors file `weights_file` holds the golden weights of `name`."""
    got, want = load_file(str(weights_file)), load_file(str(GOLDEN / f"{name}.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        if torch.backends.cpu.get_cpu_capability() == GOLDEN_CPU:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_a_20_edit_stream_ends_with_the_weights_of_the_code_before(name, tmp_path, one_thread):
    run_stream(stream_config(golden_args(name, tmp_path / name)))
    assert_golden(name, tmp_path / name / "edited_layers.safetensors")


def test_a_stream_and_a_grid_cell_of_one_config_log_the_same_and_end_alike(
        local_ray, tmp_path, one_thread):
    """The stream (a local cell) and a grid cell on Ray (one editor thread) of the golden
    config log the same metric names, perplexity included, and end with the golden
    weights. The stream runs first, so both read the same cached anchor statistics."""
    import mlflow
    import yaml

    from pipelines.grid import parse_args as grid_config, run_grid

    name = "tiny-llama-rlsedit"
    stream = run_stream(stream_config(golden_args(name, tmp_path / "stream")))
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "name": "one-path", "models": ["tiny-llama"], "editors": ["rlsedit"],
        "output_dir": str(tmp_path / "grid"), "heldout": {"corpus": str(CORPUS)},
        "resources": {"editor_cpus": 1, "evaluator_cpus": 0.5},
        "stream": {"data": str(EDIT_DATA), "num_edits": 20, "batch_size": 5, "eval_every": 20,
                   "layers": [1], "fluency_samples": 0,
                   "anchor": {"corpus": str(CORPUS), "n_texts": 20},
                   "keys": {"mode": "mean"},
                   "values": {"steps": 4, "n_prefixes": 1, "stop_on": "nll",
                              "autocast": None}}}))
    cell = run_grid(grid_config(["--config", str(config)]))["cells"]["tiny-llama-rlsedit-s0"]

    def metric_names(run_id: str) -> set[str]:
        return set(mlflow.MlflowClient().get_run(run_id).data.metrics)

    logged = metric_names(stream["mlflow_run_id"])
    assert logged == metric_names(cell["mlflow_run_id"])
    assert {"perplexity", "unedited_perplexity", "efficacy", "anchor_deviation"} <= logged
    assert stream["final"].keys() == cell["final"].keys()
    assert_golden(name, tmp_path / "grid" / "cells" / "tiny-llama-rlsedit-s0"
                  / "edited_layers.safetensors")
