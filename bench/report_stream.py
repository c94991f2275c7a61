"""Append an edit stream's summary (unedited vs edited, retention, fluency, speed) to
docs/benchmarks.md.

    python -m bench.report_stream runs/smollm2-rls-1k/summary.json --command "python -m ..."
"""

from __future__ import annotations

import argparse
import json

ROWS = ("efficacy", "generalization", "specificity", "efficacy_token_acc",
        "generalization_token_acc", "specificity_token_acc", "fluency")


def _settings(summary: dict) -> str:
    settings = {k: v for k, v in summary["editor_settings"].items()
                if k not in ("name", "kind", "dtype")}
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("summary")
    parser.add_argument("--command", required=True, help="the command that produced it")
    opts = parser.parse_args()
    s = json.load(open(opts.summary))
    cfg, final, base = s["config"], s["final"], s["unedited"]
    k = s["retention_first_k"]
    lines = [f"\n### {cfg['editor']} on {cfg['model']}: {cfg['num_edits']} sequential edits "
             f"(batch {cfg['batch_size']}, layers {s['edit_layers']}, {_settings(s)}) of {cfg['data'].split('/')[-1]}\n",
             f"`{opts.command}`\n",
             f"| metric | unedited | after {cfg['num_edits']} edits | first {k} edits: unedited"
             f" | first {k} edits: after all (retention) |", "|---|---|---|---|---|"]
    for name in ROWS:
        if name in final:
            ret = f"{final['retention_' + name]:.3f}" if "retention_" + name in final else ""
            bret = f"{base['retention_' + name]:.3f}" if "retention_" + name in base else ""
            lines.append(f"| {name} | {base.get(name, float('nan')):.3f} | {final[name]:.3f} "
                         f"| {bret} | {ret} |")
    lines.append(f"\nEditing speed: {s['edits_per_second']:.3f} edits/s "
                 f"({s['seconds_per_edit']:.2f} s per edit, keys + values + update, "
                 f"evaluation excluded).\n")
    lines.append("Over the stream (metrics on up to 200 of the edits so far, retention on the "
                 f"first {k}):\n")
    lines.append("| edits | efficacy | generalization | specificity | retention efficacy | "
                 "retention generalization |")
    lines.append("|---|---|---|---|---|---|")
    for h in s["history"]:
        lines.append(f"| {h['edits']} | {h['efficacy']:.3f} | {h['generalization']:.3f} | "
                     f"{h['specificity']:.3f} | {h['retention_efficacy']:.3f} | "
                     f"{h['retention_generalization']:.3f} |")
    with open("docs/benchmarks.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
