"""The bench commands that are grids, on a real local Ray cluster and a real MLflow store:
`bench.compare_editors` and `bench.tune_on_train` run the grid, and the section they add
to docs/benchmarks.md (and the tag on the grid's parent run) holds the command line as
the process was called."""

import shlex
import sys

import mlflow
import pytest

from bench import compare_editors, docs, report_stream, tune_on_train
from bench.grid_command import CONFIGS
from tests.conftest import ROOT
from tests.pipelines.test_grid import smoke_args

TINY = ["--set", "capability.tasks=null", "--set", "heldout.n_texts=5",
        "--set", "heldout.max_tokens=32", "--set", "stream.values.steps=4",
        "--set", "stream.values.n_prefixes=1", "--set", "stream.anchor.n_texts=20",
        "--set", "stream.fluency_samples=0", "--set", "resources.editor_cpus=0.5",
        "--set", "resources.anchor_shards=1"]


@pytest.fixture
def docs_file(tmp_path, monkeypatch):
    """docs/benchmarks.md of the test: a fresh file, the repository's left alone."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(docs, "DOCS", str(tmp_path / "benchmarks.md"))
    return tmp_path / "benchmarks.md"


def run_as_command(monkeypatch, module, script: str, args: list[str]) -> tuple[dict, str]:
    """`module.main()` with `args` as the command line: its result and that line, quoted."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    return module.main(), shlex.join(["python", "-m", f"bench.{script}", *args])


def check_recorded(result: dict, command: str, section: str) -> None:
    """The command heads the section, with the grid's table, and tags the parent run."""
    assert f"`{command}` (grid `{result['grid']}` on Ray" in section
    assert result["table"].split("\n\n", 1)[1] in section
    tags = mlflow.MlflowClient().get_run(result["parent_run_id"]).data.tags
    assert tags["bench.command"] == command


def test_compare_editors_runs_the_grid_and_appends_under_its_command(
        local_ray, tmp_path, monkeypatch, docs_file):
    args = [*smoke_args(tmp_path), *TINY, "--set", "editors=[rlsedit,ft]",
            "--set", "stream.num_edits=2", "--append"]
    result, command = run_as_command(monkeypatch, compare_editors, "compare_editors", args)
    assert list(result["cells"]) == ["tiny-llama-rlsedit-s0", "tiny-llama-ft-s0"]
    section = docs_file.read_text()
    assert section.startswith("\n### Editors compared, tiny-llama: 2 sequential edits of "
                              "counterfact-train.json, batch 2, layers [1]\n")
    check_recorded(result, command, section)
    assert "retention_efficacy:\n\n| edits | tiny-llama-rlsedit-s0 | tiny-llama-ft-s0 |" in section

    summary = tmp_path / "grid" / "cells" / "tiny-llama-ft-s0" / "summary.json"
    report_stream.main([str(summary)])   # a stream's summary, under that command
    assert f"`python -m bench.report_stream {summary}` (stream settings: " in docs_file.read_text()


def test_tune_on_train_runs_points_as_variants_and_refuses_the_edit_set(
        local_ray, tmp_path, monkeypatch, docs_file, capsys):
    args = ["--model", "tiny-llama", "--num-edits", "2", "--grid", "1:1.0:13", "ft:norm_bound=5e-3",
            "--set", f"output_dir={tmp_path / 'tune'}", *TINY, "--append"]
    result, command = run_as_command(monkeypatch, tune_on_train, "tune_on_train", args)
    assert list(result["cells"]) == ["tiny-llama-rlsedit-L1-lam1.0-mu13-s0",
                                     "tiny-llama-ft-norm_bound5e-3-s0"]
    settings = {name: cell["editor_settings"] for name, cell in result["cells"].items()}
    assert settings["tiny-llama-rlsedit-L1-lam1.0-mu13-s0"]["mu"] == 13
    assert settings["tiny-llama-ft-norm_bound5e-3-s0"]["norm_bound"] == 5e-3
    check_recorded(result, command, docs_file.read_text())

    edit_set = ["--set", "stream.data=../shared/data/counterfact/counterfact-edit.json"]
    with pytest.raises(SystemExit):
        tune_on_train.main([*args[:-1], *edit_set])
    assert "tuning edits only counterfact-train.json" in capsys.readouterr().err


def test_the_comparison_config_has_every_editor_and_tuning_refuses_it():
    from pipelines.grid import parse_args
    from tasks.editors import editor_registry
    from tasks.errors import UserError

    compare = parse_args(["--config", str(CONFIGS / "compare-editors.yaml")])
    assert compare.editors == list(editor_registry())
    assert compare.stream["data"].endswith("/counterfact-edit.json")
    with pytest.raises(UserError, match="tuning edits only counterfact-train.json"):
        tune_on_train.check_train(compare)
    tune_on_train.check_train(parse_args(["--config", str(CONFIGS / "fidelity-sweep-2.yaml")]))
