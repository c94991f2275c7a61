"""Choose RLSEdit's λ, μ and edit layer on counterfact-train.json (never the edit set).

    python -m bench.tune_on_train --num-edits 100 --grid "6:1.0:0.01" "6:1.0:0.001" "8:1.0:0.01"

Each grid point is `layer:lam:mu`; each runs one edit stream of `--num-edits` sequential
edits (batch 10) from the start of counterfact-train.json, with its own output folder under
runs/tune/ (so an interrupted sweep resumes), and the table is printed and, with
--append, added to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.edit_stream import parse_args, run_stream

TRAIN = "../shared/data/counterfact/counterfact-train.json"
COLUMNS = ("efficacy", "generalization", "specificity", "retention_efficacy",
           "retention_generalization")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", nargs="+", required=True, help="layer:lam:mu points")
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--append", action="store_true")
    opts = parser.parse_args()
    rows = []
    for point in opts.grid:
        layer, lam, mu = point.split(":")
        name = f"{opts.model}-L{layer}-lam{lam}-mu{mu}-n{opts.num_edits}"
        out = Path("runs/tune") / name
        summary_path = out / "summary.json"
        if not summary_path.exists():
            run_stream(parse_args([
                "--model", opts.model, "--data", TRAIN, "--num-edits", str(opts.num_edits),
                "--batch-size", "10", "--eval-every", str(opts.num_edits), "--layers", layer,
                "--output-dir", str(out), "--output-json", str(summary_path),
                "--set", f"rls.lam={lam}", "--set", f"rls.mu={mu}", "--set", "fluency_samples=0",
                "--set", "experiment=rlsedit-tune", "--set", f"run_name={name}"]))
        summary = json.loads(summary_path.read_text())
        rows.append((layer, lam, mu, summary))
    header = "| layer | λ | μ | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    unedited = rows[0][3]["unedited"]
    lines.append("| unedited | | | " + " | ".join(f"{unedited[c]:.3f}" for c in COLUMNS) + " |")
    for layer, lam, mu, s in rows:
        lines.append(f"| {layer} | {lam} | {mu} | "
                     + " | ".join(f"{s['final'][c]:.3f}" for c in COLUMNS) + " |")
    table = "\n".join(lines)
    print(table)
    if opts.append:
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"\n### Tuning on counterfact-train.json: {opts.num_edits} sequential edits "
                    f"(batch 10), {opts.model}\n\n`python -m bench.tune_on_train --num-edits "
                    f"{opts.num_edits} --grid {' '.join(opts.grid)} --append`\n\n{table}\n")


if __name__ == "__main__":
    main()
