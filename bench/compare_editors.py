"""Every editor on one model and the same sequential edits: table, plot, MLflow run.

    python -m bench.compare_editors --num-edits 300 --workers 2 --append

Each editor runs as its own `pipelines.edit_stream` process on the same data, layers,
keys/values settings, batch size and evaluation, `--workers` at a time with the machine's
cores split between them (so the edits/s of different editors are measured under the same
load). Every stream checkpoints; re-running the command resumes unfinished editors and
reads finished ones from their summary. At the end one MLflow run (experiment
`--experiment`, name `compare-<model>-n<N>`) gets the table, the plot (metrics against
edits applied, one line per editor) and each editor's final metrics; `--append` adds the
table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.docs import append_section, command_line
from pipelines.driver import open_tracking
from pipelines.report import comparison_table, curves_table, plot_curves, write_reports
from tasks.editors import editor_registry

DEFAULT_DATA = "../shared/data/counterfact/counterfact-edit.json"


def stream_command(opts, editor: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.edit_stream", "--model", opts.model,
            "--editor", editor, "--data", opts.data, "--num-edits", str(opts.num_edits),
            "--batch-size", str(opts.batch_size), "--eval-every", str(opts.eval_every),
            "--output-dir", str(out), "--output-json", str(out / "summary.json"),
            "--set", f"eval_max={opts.eval_max}",
            "--set", f"retention_edits={opts.retention_edits}",
            "--set", f"fluency_samples={opts.fluency_samples}",
            "--set", f"experiment={opts.experiment}",
            "--set", f"run_name={opts.model}-{editor}-n{opts.num_edits}",
            *(["--layers", opts.layers] if opts.layers else [])]


def run_editor(opts, editor: str, threads: int) -> tuple[str, int]:
    out = Path(opts.out_dir) / editor
    if (out / "summary.json").exists():
        return editor, 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(out / "stream.log", "a") as log:
        done = subprocess.run(stream_command(opts, editor, out), env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    print(f"{editor}: exit {done.returncode} (log: {out / 'stream.log'})", flush=True)
    return editor, done.returncode


def log_to_mlflow(opts, summaries: dict, table: str, files: list[Path]) -> str:
    import mlflow

    open_tracking(opts.experiment)
    with mlflow.start_run(run_name=f"compare-{opts.model}-n{opts.num_edits}") as run:
        mlflow.log_params({"model": opts.model, "num_edits": opts.num_edits,
                           "batch_size": opts.batch_size, "editors": ",".join(summaries),
                           "data": opts.data, "workers": opts.workers})
        for name, s in summaries.items():
            mlflow.log_param(f"run_id.{name}", s["mlflow_run_id"])
            mlflow.log_metrics({f"{name}.{k}": v for k, v in s["final"].items()
                                if isinstance(v, float)})
            mlflow.log_metric(f"{name}.edits_per_second", s["edits_per_second"])
        mlflow.log_text(table, "comparison.md")
        for path in files:
            mlflow.log_artifact(str(path))
        mlflow.log_dict(summaries, "summaries.json")
        return run.info.run_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--editors", nargs="+", default=list(editor_registry()))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--num-edits", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--layers", default=None, help="comma-separated; default: the model's")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-max", type=int, default=100)
    parser.add_argument("--retention-edits", type=int, default=100)
    parser.add_argument("--fluency-samples", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="default runs/compare-<model>-n<N>")
    parser.add_argument("--experiment", default="rlsedit-compare")
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    opts.out_dir = opts.out_dir or f"runs/compare-{opts.model}-n{opts.num_edits}"
    threads = max(1, (os.cpu_count() or 1) // opts.workers)

    open_tracking(opts.experiment)  # create the store once, before streams race to
    with ThreadPoolExecutor(opts.workers) as pool:
        codes = dict(pool.map(lambda e: run_editor(opts, e, threads), opts.editors))
    failed = [e for e, code in codes.items() if code != 0]
    summaries = {e: json.loads((Path(opts.out_dir) / e / "summary.json").read_text())
                 for e in opts.editors if e not in failed}
    if not summaries:
        sys.exit(f"every editor failed: {failed}")

    title = f"{opts.model}: {opts.num_edits} sequential CounterFact edits, batch {opts.batch_size}"
    plot_path = plot_curves(summaries, Path(opts.out_dir) / "comparison.png", title)
    reports = write_reports(summaries, opts.out_dir, opts.model.replace("/", "_"), title)
    table = comparison_table(summaries)
    curves = "\n\n".join(f"{metric}:\n\n{curves_table(summaries, metric)}"
                         for metric in ("efficacy", "specificity", "retention_efficacy"))
    run_id = log_to_mlflow(opts, summaries, table + "\n\n" + curves, [plot_path, *reports.values()])
    print(f"\n{table}\n\n{curves}\n\nplot: {plot_path}\nMLflow run: {run_id}")
    if failed:
        print(f"FAILED: {failed} (see their stream.log); re-run the command to resume them")
    if opts.append:
        layers = next(iter(summaries.values()))["edit_layers"]
        append_section(f"{title}, layers {layers}, {len(summaries)} editors",
                       command_line("bench.compare_editors", argv),
                       f"{opts.workers} editors at a time, {threads} thread(s) each",
                       f"{table}\n\n{curves}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
