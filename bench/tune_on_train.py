"""Choose editors' hyper-parameters on counterfact-train.json (never the edit set).

    python -m bench.tune_on_train --num-edits 100 --grid 6:1.0:0.01 6:1.0:0.001
    python -m bench.tune_on_train --num-edits 20 --grid ft:norm_bound=5e-4 ft:norm_bound=5e-3

A grid point is `editor:key=value,key=value` (settings of tasks/editors/editors.yaml, plus
`layers=6` or `layers=4+5+6`), or RLSEdit's older form `layer:lam:mu`. Each point runs one
edit stream of `--num-edits` sequential edits (batch 10) from the start of
counterfact-train.json with its own output folder under runs/tune/ (an interrupted sweep
resumes); the table is printed and, with --append, added to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipelines.edit_stream import parse_args, run_stream

TRAIN = "../shared/data/counterfact/counterfact-train.json"
COLUMNS = ("efficacy", "generalization", "specificity", "retention_efficacy",
           "retention_generalization")


def parse_point(point: str) -> tuple[str, dict[str, str]]:
    """`editor:k=v,k=v` or `layer:lam:mu` -> (editor, {key: value})."""
    if re.fullmatch(r"\d+:[^:=]+:[^:=]+", point):
        layer, lam, mu = point.split(":")
        return "rlsedit", {"layers": layer, "lam": lam, "mu": mu}
    editor, _, rest = point.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    return editor, settings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", nargs="+", required=True,
                        help="points: editor:key=value,... or layer:lam:mu")
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--append", action="store_true")
    opts = parser.parse_args()
    rows = []
    for point in opts.grid:
        editor, settings = parse_point(point)
        layers = settings.pop("layers", None)
        tag = "-".join(f"{k}{v}" for k, v in settings.items())
        name = f"{opts.model}-{editor}-L{layers or 'default'}-{tag}-n{opts.num_edits}"
        out = Path("runs/tune") / name
        summary_path = out / "summary.json"
        if not summary_path.exists():
            argv = ["--model", opts.model, "--editor", editor, "--data", TRAIN,
                    "--num-edits", str(opts.num_edits), "--batch-size", "10",
                    "--eval-every", str(opts.num_edits), "--output-dir", str(out),
                    "--output-json", str(summary_path), "--set", "fluency_samples=0",
                    "--set", "experiment=rlsedit-tune", "--set", f"run_name={name}"]
            argv += ["--layers", layers.replace("+", ",")] if layers else []
            argv += [a for k, v in settings.items() for a in ("--set", f"editor_args.{k}={v}")]
            run_stream(parse_args(argv))
        rows.append((point, json.loads(summary_path.read_text())))
    header = "| point | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    unedited = rows[0][1]["unedited"]
    lines.append("| unedited | " + " | ".join(f"{unedited[c]:.3f}" for c in COLUMNS) + " |")
    for point, s in rows:
        lines.append(f"| {point} | " + " | ".join(f"{s['final'][c]:.3f}" for c in COLUMNS) + " |")
    table = "\n".join(lines)
    print(table)
    if opts.append:
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"\n### Tuning on counterfact-train.json: {opts.num_edits} sequential edits "
                    f"(batch 10), {opts.model}\n\n`python -m bench.tune_on_train --num-edits "
                    f"{opts.num_edits} --grid {' '.join(opts.grid)} --append`\n\n{table}\n")


if __name__ == "__main__":
    main()
