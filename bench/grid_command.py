"""Bench commands that are grids (`pipelines.grid`): the command's own options first, the
grid's (`--config`, `--set`, `--output-json`, `--debug`) passed on as they are. The grid's
table is printed; the command line, as this process was called, goes on the grid's MLflow
parent run as the tag `bench.command` and, with `--append`, above the tables it adds to
docs/benchmarks.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.docs import append_section, command_line

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def grid_parser(description: str) -> argparse.ArgumentParser:
    """The command's parser, with `--append`; what it does not know goes to the grid."""
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        epilog="Other options go to the grid: see python -m pipelines.grid --help.")
    parser.add_argument("--append", action="store_true",
                        help="add the tables to docs/benchmarks.md")
    return parser


def run(grid_argv: list[str], check=None) -> dict:
    """The result of `pipelines.grid` on the command line `grid_argv`, logged and with
    one-line user errors as `python -m pipelines.grid` does; `check(cfg)` may raise a
    UserError to refuse the config before anything runs."""
    from pipelines.driver import one_line_errors, setup_logging
    from pipelines.grid import parse_args, run_grid

    setup_logging()
    with one_line_errors(grid_argv):
        cfg = parse_args(grid_argv)
        if check is not None:
            check(cfg)
        result = run_grid(cfg)
    print(f"\n{result['table']}\n\ngrid {result['grid']}: MLflow parent run "
          f"{result['parent_run_id']}")
    return result


def describe(result: dict) -> str:
    """`<models>: <n> sequential edits of <data>, batch <b>, layers <l>`, as the cells ran."""
    first = next(iter(result["cells"].values()))
    stream = first["config"]
    layers = sorted({str(s["edit_layers"]) for s in result["cells"].values()})
    return (f"{', '.join(result['config']['models'])}: {stream['num_edits']} sequential edits "
            f"of {Path(stream['data']).name}, batch {stream['batch_size']}, "
            f"layers {' or '.join(layers)}")


def record(result: dict, module: str, argv, heading: str, body: str, append: bool) -> str:
    """Tag the grid's parent run with the command line (of this process, or `argv`) and,
    with `append`, add `heading`, the command and `body` to docs/benchmarks.md."""
    import mlflow

    command = command_line(module, argv)
    mlflow.MlflowClient().set_tag(result["parent_run_id"], "bench.command", command)
    if append:
        res = result["config"]["resources"]
        append_section(heading, command,
                       f"grid `{result['grid']}` on Ray, {res['editor_cpus']} CPU per editor, "
                       f"{res['evaluator_cpus']} per evaluator; MLflow parent run "
                       f"{result['parent_run_id']}", body)
    return command
