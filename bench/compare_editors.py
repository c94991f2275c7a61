"""Every editor on one model and the same sequential edits, as one grid.

The grid is pipelines/configs/compare-editors.yaml; this prints its table and the metrics
at each evaluation point.

    python -m bench.compare_editors --append
    python -m bench.compare_editors --set stream.num_edits=1000 --set stream.eval_every=250 \\
        --set "editors=[rlsedit,memit,alphaedit,ft]" --append

Without `--append` this is `python -m pipelines.grid --config
pipelines/configs/compare-editors.yaml` (or `--config` here) with the same options: the
table, the plots and reports per model in the grid's output folder, one MLflow parent run
with a child run per editor; re-running the command resumes. `--append` adds the table and
the curves to docs/benchmarks.md under this command line.
"""

from __future__ import annotations

from bench.grid_command import CONFIGS, describe, grid_parser, record, run
from pipelines.report import curves_table

CURVES = ("efficacy", "specificity", "retention_efficacy")


def curves(cells: dict[str, dict]) -> str:
    """Each of CURVES at every evaluation point, a column per cell."""
    return "\n\n".join(f"{metric}:\n\n{curves_table(cells, metric)}" for metric in CURVES)


def main(argv=None) -> dict:
    parser = grid_parser(__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIGS / "compare-editors.yaml"),
                        help="grid YAML (default: compare-editors.yaml)")
    opts, grid_argv = parser.parse_known_args(argv)
    result = run(["--config", opts.config, *grid_argv])
    over_stream = curves(result["cells"])
    print(f"\n{over_stream}")
    record(result, "bench.compare_editors", argv, f"Editors compared, {describe(result)}",
           f"{result['table']}\n\n{over_stream}", opts.append)
    return result


if __name__ == "__main__":
    main()
