"""Comparison reports over several edit-stream summaries (one per editor or grid cell):
tables of final metrics (markdown and HTML) and plots of metrics against edits applied.

A summary is what `EditStream.summary` / the grid write: `final` and `unedited` metrics,
`history` (one dict per evaluation point, with `edits`), `retention_first_k`,
`edits_per_second`. Capability scores are the `cap.<task>.<metric>` keys.
"""

from __future__ import annotations

import html
from pathlib import Path

TABLE_COLUMNS = ("efficacy", "generalization", "specificity", "specificity_nbhd", "fluency",
                 "retention_efficacy",
                 "retention_generalization", "retention_specificity")
EDIT_METRICS = ("efficacy", "generalization", "specificity", "specificity_nbhd")
RETENTION_METRICS = ("retention_efficacy", "retention_generalization", "retention_specificity")
CURVES = EDIT_METRICS + RETENTION_METRICS
CAPABILITY_PREFIX = "cap."


def _cell(value, se=None) -> str:
    """`0.935` or, with a standard error, `0.935 ± 0.008`."""
    if value is None:
        return ""
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


def _value(metrics: dict, name: str) -> str:
    return _cell(metrics.get(name), metrics.get(name + "_se"))


def capability_metrics(summaries: dict[str, dict]) -> list[str]:
    """The `cap.*` metric names any summary has, in a stable order."""
    names = {k for s in summaries.values() for h in [s["final"], *s["history"]] for k in h
             if k.startswith(CAPABILITY_PREFIX)}
    return sorted(names)


def _short(metric: str, k: int) -> str:
    name = metric.replace("retention_", f"first-{k} ")
    return name[len(CAPABILITY_PREFIX):].replace("rlsedit_", "") if name.startswith(
        CAPABILITY_PREFIX) else name


def comparison_rows(summaries: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the unedited model, then one row per summary (final metrics,
    capability scores, edits/s)."""
    any_summary = next(iter(summaries.values()))
    k = any_summary["retention_first_k"]
    columns = [*TABLE_COLUMNS, *capability_metrics(summaries)]
    header = ["editor", *(_short(c, k) for c in columns), "edits/s"]
    base = any_summary["unedited"]
    rows = [["unedited", *(_value(base, c) for c in columns), ""]]
    for name, s in summaries.items():
        rows.append([name, *(_value(s["final"], c) for c in columns),
                     f"{s['edits_per_second']:.3f}"])
    return header, rows


def comparison_table(summaries: dict[str, dict]) -> str:
    """Markdown table of `comparison_rows`."""
    header, rows = comparison_rows(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_html(summaries: dict[str, dict], title: str = "") -> str:
    """A standalone HTML page with the table of `comparison_rows`."""
    header, rows = comparison_rows(summaries)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                     for row in rows)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>table{border-collapse:collapse;font-family:sans-serif}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>"
            f"<h3>{html.escape(title)}</h3>\n<table><tr>{head}</tr>\n{body}\n</table>"
            "</body></html>\n")


def paired_difference(a: list[float], b: list[float], resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over paired scores and its 95% paired-bootstrap interval (edits
    resampled with replacement, seeded). NaN pairs (no prompt to score) are left out."""
    import torch

    pairs = torch.tensor([(x, y) for x, y in zip(a, b) if x == x and y == y],
                         dtype=torch.float64).reshape(-1, 2)
    diff = pairs[:, 0] - pairs[:, 1]
    if len(diff) == 0:
        return float("nan"), float("nan"), float("nan")
    picks = torch.randint(len(diff), (resamples, len(diff)),
                          generator=torch.Generator().manual_seed(seed))
    means = diff[picks].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(diff.mean()), float(low), float(high)


def paired_table(summaries: dict[str, dict], metrics=("efficacy", "generalization", "specificity",
                                                      "specificity_nbhd", "retention_efficacy"),
                 pairs: list[tuple[str, str]] | None = None) -> str:
    """Markdown: for each pair of summaries scored on the same edits (`final_scores`), the
    mean difference of each metric edit by edit and its 95% interval; `*` marks an
    interval that excludes 0. `pairs`: which (first, second) names (default: every pair
    in order). Empty when no pair has scores on the same edits."""
    scored = {name: s["final_scores"] for name, s in summaries.items() if s.get("final_scores")}
    names = list(scored)
    pairs = pairs or [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    pairs = [(a, b) for a, b in pairs if a in scored and b in scored
             and scored[a]["edits"] == scored[b]["edits"]]
    metrics = [m for m in metrics if all(m in scored[name] for pair in pairs for name in pair)]
    rows = []
    for first, second in pairs:
        cells = []
        for metric in metrics:
            mean, low, high = paired_difference(scored[first][metric], scored[second][metric])
            mark = "*" if low > 0 or high < 0 else ""
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{mark}")
        rows.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    k = next(iter(summaries.values()))["retention_first_k"]
    header = ["pair", *(m.replace("retention_", f"first-{k} ") for m in metrics)]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])


def curves_table(summaries: dict[str, dict], metric: str) -> str:
    """Markdown: `metric` at each evaluation point (rows) for each summary (columns)."""
    steps = sorted({h["edits"] for s in summaries.values() for h in s["history"]})
    lines = ["| edits | " + " | ".join(summaries) + " |", "|" + "---|" * (len(summaries) + 1)]
    for step in steps:
        row = [next((h.get(metric) for h in s["history"] if h["edits"] == step), None)
               for s in summaries.values()]
        lines.append(f"| {step} | " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def plot_panels(summaries: dict[str, dict], metrics: list[str] | tuple[str, ...],
                path: str | Path, title: str = "", unit_range: bool = True) -> Path:
    """One panel per metric against edits applied, one line per summary, the unedited
    model's value as a dashed grey line. Written as PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.7 * cols, 3.8 * rows), sharex=True,
                             squeeze=False)
    base = next(iter(summaries.values()))["unedited"]
    k = next(iter(summaries.values()))["retention_first_k"]
    for ax, metric in zip(axes.flat, metrics):
        for name, s in summaries.items():
            points = [(h["edits"], h[metric], h.get(metric + "_se"))
                      for h in s["history"] if h.get(metric) is not None]
            if points:
                line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                                label=name)
                if all(p[2] is not None for p in points):   # a band of ±1 standard error
                    ax.fill_between([p[0] for p in points], [p[1] - p[2] for p in points],
                                    [p[1] + p[2] for p in points], color=line.get_color(),
                                    alpha=0.15, linewidth=0)
        if base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle="--", linewidth=1, label="unedited")
        label = metric.replace("retention_", f"retention (first {k}): ")
        ax.set_title(label[len(CAPABILITY_PREFIX):] if label.startswith(CAPABILITY_PREFIX)
                     else label, fontsize=10)
        if unit_range and not any(w in metric for w in ("perplexity", "bits_per_byte")):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("edits applied")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it as PNG to `path` (folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(summaries: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Edit metrics (top row) and retention of the first k edits (bottom row) in one PNG."""
    return plot_panels(summaries, CURVES, path, title)


def write_reports(summaries: dict[str, dict], out_dir: str | Path, stem: str,
                  title: str = "") -> dict[str, Path]:
    """Every report of one comparison, as files in `out_dir` named `<kind>-<stem>.*`:
    metrics, retention, anchor deviation (when logged) and (when scored) capability plots
    against edits applied (bands: ±1 standard error where logged), and
    the final table as markdown and HTML. Returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = next(iter(summaries.values()))["retention_first_k"]
    files = {
        "metrics": plot_panels(summaries, EDIT_METRICS, out_dir / f"metrics-{stem}.png",
                               f"{title}: edit metrics"),
        "retention": plot_panels(summaries, RETENTION_METRICS, out_dir / f"retention-{stem}.png",
                                 f"{title}: retention of the first {k} edits"),
    }
    if any("anchor_deviation" in h for s in summaries.values() for h in s["history"]):
        files["deviation"] = plot_panels(summaries, ["anchor_deviation"],
                                         out_dir / f"deviation-{stem}.png",
                                         f"{title}: anchor deviation", unit_range=False)
    capability = capability_metrics(summaries)
    if capability:
        files["capability"] = plot_panels(summaries, capability,
                                          out_dir / f"capability-{stem}.png",
                                          f"{title}: capability", unit_range=True)
    files["table_md"] = out_dir / f"comparison-{stem}.md"
    paired = paired_table(summaries)
    if paired:
        paired = ("\n\nPaired differences on the same edits (mean, 95% paired-bootstrap "
                  "interval; * excludes 0):\n\n" + paired)
    files["table_md"].write_text(f"{title}\n\n{comparison_table(summaries)}{paired}\n")
    files["table_html"] = out_dir / f"comparison-{stem}.html"
    files["table_html"].write_text(comparison_html(summaries, title))
    return files
