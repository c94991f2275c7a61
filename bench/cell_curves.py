"""Table and curves of grid cells so far: a long run read while it runs or after it
stopped (issue 15's 10,000-edit run), or several finished cells side by side.

    python -m bench.cell_curves /root/rlsedit-runs/grid-cpu-10k/cells/smollm2-135m-rlsedit-L23456-m1300-s0 \
        --plot docs/img/cpu-10k-smollm2-135m.png --append

Reads each cell's `evals.json` (the scores of each evaluation point so far) and its
newest checkpoint (the unedited scores, the edits applied, the seconds they took and the
editor's own figures at each point). Prints, for the unedited model (of the first cell)
and each cell's points, the edit metrics ± standard error, the retention of the first k
edits (and of the first 1,000 where the stream scores it), held-out perplexity, the
capability scores and the seconds per edit so far; `--plot` draws the same against edits
applied, one line per cell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.docs import publish
from pipelines.report import _value, plot_panels
from tasks.storage import Location
from tasks.stream import newest_checkpoint

COLUMNS = {"efficacy": "efficacy", "generalization": "generalization",
           "specificity": "specificity", "retention_efficacy": "first-{k} efficacy",
           "retention1000_efficacy": "first-1000 efficacy",
           "recent_efficacy": "efficacy of the newest edits", "perplexity": "held-out token ppl",
           "cap.rlsedit_sst2.acc": "SST-2", "cap.rlsedit_agnews.acc": "AG News"}


def read_cell(cell_dir: str, first_k: int = 100) -> dict:
    """A summary-like dict of the cell so far: {"unedited", "history", "retention_first_k",
    "position", "edit_seconds"}; history has one entry per scored point, in edit order."""
    state = newest_checkpoint(Location(cell_dir))
    if state is None:
        raise SystemExit(f"no checkpoint in {cell_dir}: the cell has not applied an edit yet")
    path = Path(cell_dir) / "evals.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    editor = {h["edits"]: h for h in state["history"]}
    history = [{**editor.get(int(n), {}), **metrics, "edits": int(n)}
               for n, metrics in sorted(scores.items(), key=lambda item: int(item[0]))]
    return {"unedited": state["baseline"], "history": history, "retention_first_k": first_k,
            "position": state["position"], "edit_seconds": state["edit_seconds"]}


def _cell(row: dict, metric: str) -> str:
    """pipelines.report's `0.935 ± 0.008`; perplexity to one decimal."""
    if metric == "perplexity" and row.get(metric) is not None:
        return f"{row[metric]:.1f}"
    return _value(row, metric)


def table(cells: dict[str, dict]) -> str:
    """Markdown: the unedited row of the first cell, then one row per cell and point."""
    first = next(iter(cells.values()))
    rows = [row for cell in cells.values() for row in cell["history"]]
    columns = [m for m in COLUMNS if any(m in row for row in [first["unedited"], *rows])]
    header = ["cell, edits", *(COLUMNS[m].format(k=first["retention_first_k"]) for m in columns),
              "s per edit so far"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| unedited | " + " | ".join(_cell(first["unedited"], m) for m in columns) + " | |"]
    for name, cell in cells.items():
        for row in cell["history"]:
            speed = row.get("edits_per_second")
            seconds = f"{1 / speed:.2f}" if speed else ""
            lines.append(f"| {name} {row['edits']} | "
                         + " | ".join(_cell(row, m) for m in columns) + f" | {seconds} |")
    return "\n".join(lines)


def progress_line(name: str, cell: dict) -> str:
    return (f"{name}: {cell['position']} edits applied in {cell['edit_seconds'] / 3600:.2f} h "
            f"of editing ({cell['edit_seconds'] / max(cell['position'], 1):.2f} s per edit).")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell_dirs", nargs="+")
    parser.add_argument("--first-k", type=int, default=100, help="the streams' retention_edits")
    parser.add_argument("--plot", help="write the curves to this PNG")
    parser.add_argument("--title", help="the plot's title and the docs heading (default: the "
                        "cells' names)")
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    cells = {Path(d.rstrip("/")).name: read_cell(d, opts.first_k) for d in opts.cell_dirs}
    title = opts.title or f"{', '.join(cells)}: the run so far"
    body = table(cells) + "\n\n" + "\n".join(progress_line(n, c) for n, c in cells.items())
    if opts.plot and any(cell["history"] for cell in cells.values()):
        metrics = [m for m in COLUMNS if any(m in row for c in cells.values() for row in c["history"])]
        plot_panels(cells, metrics, opts.plot, title)
        if opts.plot.startswith("docs/"):
            body += f"\n\n![the cells against edits applied]({Path(opts.plot).relative_to('docs')})"
    publish(body, opts.append, title, "bench.cell_curves", argv,
            "this machine, read from the cells' files while or after they ran")


if __name__ == "__main__":
    main()
