"""Comparison reports over several edit-stream summaries (one per editor or grid cell):
a markdown table of final metrics and a plot of metrics against edits applied."""

from __future__ import annotations

from pathlib import Path

TABLE_COLUMNS = ("efficacy", "generalization", "specificity", "fluency", "retention_efficacy",
                 "retention_generalization", "retention_specificity")
CURVES = ("efficacy", "generalization", "specificity", "retention_efficacy",
          "retention_generalization", "retention_specificity")


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}"


def comparison_table(summaries: dict[str, dict]) -> str:
    """Markdown: one row per summary (final metrics, edits/s) plus the unedited model."""
    any_summary = next(iter(summaries.values()))
    k = any_summary["retention_first_k"]
    header = ["editor", *TABLE_COLUMNS, "edits/s"]
    header = [h.replace("retention_", f"first-{k} ") for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = any_summary["unedited"]
    lines.append("| unedited | " + " | ".join(_cell(base.get(c)) for c in TABLE_COLUMNS) + " | |")
    for name, s in summaries.items():
        cells = [_cell(s["final"].get(c)) for c in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['edits_per_second']:.3f} |")
    return "\n".join(lines)


def curves_table(summaries: dict[str, dict], metric: str) -> str:
    """Markdown: `metric` at each evaluation point (rows) for each summary (columns)."""
    steps = sorted({h["edits"] for s in summaries.values() for h in s["history"]})
    lines = ["| edits | " + " | ".join(summaries) + " |", "|" + "---|" * (len(summaries) + 1)]
    for step in steps:
        row = [next((h[metric] for h in s["history"] if h["edits"] == step), None)
               for s in summaries.values()]
        lines.append(f"| {step} | " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def plot_curves(summaries: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """One panel per metric in CURVES against edits applied, one line per summary; the
    unedited model's value as a dashed grey line. Written as PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True)
    base = next(iter(summaries.values()))["unedited"]
    k = next(iter(summaries.values()))["retention_first_k"]
    for ax, metric in zip(axes.flat, CURVES):
        for name, s in summaries.items():
            xs = [h["edits"] for h in s["history"]]
            ax.plot(xs, [h[metric] for h in s["history"]], marker="o", label=name)
        if metric in base:
            ax.axhline(base[metric], color="grey", linestyle="--", linewidth=1, label="unedited")
        ax.set_title(metric.replace("retention_", f"retention (first {k}): "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("edits applied")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
