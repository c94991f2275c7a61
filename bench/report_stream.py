"""Append an edit stream's summary (unedited vs edited, retention, fluency, speed) to
docs/benchmarks.md, under this command and the stream's settings as its summary records
them (those not at their defaults).

    python -m bench.report_stream runs/smollm2-rls-1k/summary.json
"""

from __future__ import annotations

import argparse
import json

from bench.docs import append_section, command_line
from tasks.config import flatten, to_dict
from tasks.stream import StreamConfig

ROWS = ("efficacy", "generalization", "specificity", "specificity_nbhd", "efficacy_token_acc",
        "generalization_token_acc", "specificity_token_acc", "fluency", "perplexity")


def _settings(summary: dict) -> str:
    settings = {k: v for k, v in summary["editor_settings"].items()
                if k not in ("name", "kind", "dtype")}
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def stream_setting(summary: dict) -> str:
    """The stream's config keys whose values differ from StreamConfig's defaults."""
    default = flatten(to_dict(StreamConfig()))
    changed = {k: v for k, v in flatten(summary["config"]).items() if default.get(k) != v}
    return "stream settings: " + (", ".join(f"{k}={v}" for k, v in changed.items())
                                  or "the defaults")


def report(s: dict) -> str:
    """The summary's tables: final metrics, speed, metrics over the stream."""
    cfg, final, base = s["config"], s["final"], s["unedited"]
    k = s["retention_first_k"]
    lines = [f"| metric | unedited | after {cfg['num_edits']} edits | first {k} edits: unedited"
             f" | first {k} edits: after all (retention) |", "|---|---|---|---|---|"]
    for name in ROWS:
        if name in final:
            ret = f"{final['retention_' + name]:.3f}" if "retention_" + name in final else ""
            bret = f"{base['retention_' + name]:.3f}" if "retention_" + name in base else ""
            se = f" ± {final[name + '_se']:.3f}" if name + "_se" in final else ""
            lines.append(f"| {name} | {base.get(name, float('nan')):.3f} | {final[name]:.3f}{se} "
                         f"| {bret} | {ret} |")
    lines.append(f"\nEditing speed: {s['edits_per_second']:.3f} edits/s "
                 f"({s['seconds_per_edit']:.2f} s per edit, keys + values + update, "
                 f"evaluation excluded).\n")
    lines.append(f"Over the stream (metrics on up to {cfg.get('eval_max', 200)} of the edits "
                 f"so far, retention on the first {k}):\n")
    lines.append("| edits | efficacy | generalization | specificity | retention efficacy | "
                 "retention generalization |")
    lines.append("|---|---|---|---|---|---|")
    for h in s["history"]:
        lines.append(f"| {h['edits']} | {h['efficacy']:.3f} | {h['generalization']:.3f} | "
                     f"{h['specificity']:.3f} | {h['retention_efficacy']:.3f} | "
                     f"{h['retention_generalization']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("summary")
    opts = parser.parse_args(argv)
    with open(opts.summary) as f:
        s = json.load(f)
    cfg = s["config"]
    body = report(s)
    append_section(f"{cfg['editor']} on {cfg['model']}: {cfg['num_edits']} sequential edits "
                   f"(batch {cfg['batch_size']}, layers {s['edit_layers']}, {_settings(s)}) "
                   f"of {cfg['data'].split('/')[-1]}", command_line("bench.report_stream", argv),
                   stream_setting(s), body)
    print(body)


if __name__ == "__main__":
    main()
