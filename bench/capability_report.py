"""Capability suite and early-edit retention of every cell's final weights in a grid's
output folder (`pipelines/configs/compare-editors.yaml`: runs/grid-compare-editors), or of
every editor in a folder of the former `bench.compare_editors` streams, through
`pipelines.reeval`, as one table.

    python -m bench.capability_report --compare-dir runs/grid-compare-editors --append

Each editor's stream run (MLflow) gets the suite's `cap.*` scores and the retention of its
first k edits on its final weights (what reeval has not scored yet; `--all-snapshots`:
on every logged snapshot), then the table reads them back at the last step: unedited model first, then one row per editor, with the
seconds the capability suite and the retention scoring took on that snapshot.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from bench.docs import append_section, command_line
from pipelines.reeval import ReevalConfig, run_reeval
from tasks.evaluate.capability import CapabilityArgs


def last_value(client, run_id: str, key: str, step: int):
    points = [m for m in client.get_metric_history(run_id, key) if m.step == step]
    return points[-1].value if points else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare-dir", required=True, help="a grid's output folder")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--first-k", type=int, default=100)
    parser.add_argument("--all-snapshots", action="store_true")
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    from mlflow import MlflowClient

    folder = Path(opts.compare_dir)
    paths = sorted(folder.glob("cells/*/summary.json")) or sorted(folder.glob("*/summary.json"))
    summaries = {p.parent.name: json.loads(p.read_text()) for p in paths}
    if not summaries:
        sys.exit(f"no cells/<cell>/summary.json or <editor>/summary.json under {folder}")
    capability = CapabilityArgs(profile=opts.profile, limit=opts.limit)
    tic = time.perf_counter()
    run_reeval(ReevalConfig(run_ids=[s["mlflow_run_id"] for s in summaries.values()],
                            first_k=opts.first_k, capability=capability, use_ray=False,
                            last_only=not opts.all_snapshots))
    elapsed = time.perf_counter() - tic

    client = MlflowClient()
    first = next(iter(summaries.values()))
    base = client.get_run(first["mlflow_run_id"]).data.metrics
    metrics = sorted(k[len("unedited_"):] for k in base if k.startswith("unedited_cap."))
    retention = [f"reeval.first{opts.first_k}.{m}" for m in ("efficacy", "generalization",
                                                               "specificity")]
    columns = metrics + retention
    short = [c.replace("cap.rlsedit_", "").replace(f"reeval.first{opts.first_k}.",
                                                   f"first-{opts.first_k} ") for c in columns]
    header = ["editor", "edits", *short, "capability s", "retention s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| unedited | 0 | " + " | ".join(
        f"{base['unedited_' + c]:.3f}" if "unedited_" + c in base else "" for c in columns)
        + " | | |")
    for editor, s in summaries.items():
        n = s["config"]["num_edits"]
        values = [last_value(client, s["mlflow_run_id"], c, n) for c in columns]
        seconds = [last_value(client, s["mlflow_run_id"], f"timing.{k}_seconds", n)
                   for k in ("capability", "retention")]
        cells = ["" if v is None else f"{v:.3f}" for v in values]
        cells += ["" if v is None else f"{v:.1f}" for v in seconds]
        lines.append(f"| {editor} | {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\n{table}\n\nreeval took {elapsed:.0f} s")
    if opts.append:
        append_section(f"Capability suite `{opts.profile}` and first-{opts.first_k} retention "
                       f"after {first['config']['num_edits']} edits ({first['config']['model']})",
                       command_line("bench.capability_report", argv),
                       f"{platform.machine()}, {platform.processor() or 'CPU'}; "
                       f"timings are of one snapshot, in this process", table)


if __name__ == "__main__":
    main()
