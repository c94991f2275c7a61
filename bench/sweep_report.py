"""The table and the trade-off plot of one or more finished grid sweeps (issue 13).

    python -m bench.sweep_report --grid-dir /root/rlsedit-runs/grid-fidelity-sweep \
        --plot docs/img/tradeoff-smollm2-135m.png --append

Reads every cell's `summary.json` under `<grid-dir>/cells/`, prints one row per cell with
the final edit metrics ± their standard error (each is a share of edits over the n scored,
so SE = √(p(1−p)/n)), the first-k retention, held-out perplexity (the grid's token
perplexity and lm-eval's word perplexity), the capability scores, fluency, the anchor
deviation tr(ΔWᵀC̄0ΔW)/tr(W0ᵀC̄0W0) (from the edited layers when a cell predates its
logging), the share of edits whose target value did not converge, and edits/s. The plot
puts each cell at (held-out perplexity, efficacy), one line per editor kind through its
settings. `--pair A B` adds the paired difference of two cells edit by edit, also across
grid folders (a cell name found in two grids is labelled `grid/cell` the second time):

    python -m bench.sweep_report --grid-dir /root/rlsedit-runs/grid-cpu-1k-half \
        /root/rlsedit-runs/grid-cpu-1k --pair rlsedit-L23456-m1300-half memit-L23456-half
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench.docs import publish
from pipelines.report import paired_table, save_figure

SHARES = ("efficacy", "generalization", "specificity", "specificity_nbhd", "retention_efficacy")
SETTING_KEY = {"rls": "mu", "memit": "cov_weight", "alphaedit": "nullspace_rel", "ft": "norm_bound"}
CAP = ("cap.rlsedit_agnews_ppl.word_perplexity", "cap.rlsedit_sst2.acc", "cap.rlsedit_agnews.acc")


def read_cells(grid_dirs: list[str], skip: list[str] = ()) -> dict[str, dict]:
    """{cell name: summary} over every finished cell of the grids whose name contains none
    of `skip`, in name order; a cell finished before the anchor deviation was logged gets
    it from its edited layers."""
    cells = {}
    for grid_dir in grid_dirs:
        for path in sorted(Path(grid_dir).glob("cells/*/summary.json")):
            if any(part in path.parent.name for part in skip):
                continue
            summary = json.loads(path.read_text())
            if "anchor_deviation" not in summary["final"]:
                summary["final"]["anchor_deviation"] = final_deviation(summary, path.parent)
            name = path.parent.name
            cells[name if name not in cells else f"{Path(grid_dir).name}/{name}"] = summary
    if not cells:
        raise SystemExit(f"no finished cell (cells/*/summary.json) under {grid_dirs}")
    return cells


def find_cell(cells: dict[str, dict], text: str) -> str:
    """The one cell named `text`, or whose name contains it; SystemExit otherwise."""
    if text in cells:
        return text
    found = [name for name in cells if text in name]
    if len(found) != 1:
        raise SystemExit(f"--pair {text!r} matches {len(found)} cells ({found[:5]}): give a "
                         f"longer part of one cell's name")
    return found[0]


def paired_rows(cells: dict[str, dict], pairs: list[list[str]]) -> str:
    """`pipelines.report.paired_table` over the named pairs of cells, edit by edit from the
    per-edit scores each summary carries (cells of any of the grids, on the same edits)."""
    pairs = [(find_cell(cells, a), find_cell(cells, b)) for a, b in pairs]
    for name in {name for pair in pairs for name in pair}:
        if not cells[name].get("final_scores"):
            raise SystemExit(f"the cell {name} kept no per-edit scores (final_scores)")
    table = paired_table(cells, pairs=pairs)
    return table or "(no pair was scored on the same edits)"


def final_deviation(summary: dict, cell_dir: Path) -> float:
    """Mean over edit layers of `AnchorStats.deviation` of the cell's final weights."""
    from safetensors.torch import load_file

    from tasks.anchor import AnchorArgs, cached_anchor_stats
    from tasks.config import from_dict
    from tasks.models import load_model

    lm = load_model(summary["config"]["model"])
    layers = summary["edit_layers"]
    anchor = cached_anchor_stats(lm, layers, from_dict(AnchorArgs, summary["config"]["anchor"]),
                                 progress=False)
    edited = load_file(str(cell_dir / "edited_layers.safetensors"))
    return sum(anchor[l].deviation(edited[lm.spec.mlp_out_name(l) + ".weight"].T,
                                   lm.mlp_out(l).weight.detach().T) for l in layers) / len(layers)


def with_se(p: float | None, n: int, se: float | None = None) -> str:
    """`p ± se`; without a logged `se`, the binomial one over `n`."""
    if p is None:
        return ""
    if se is None:
        se = math.sqrt(max(p * (1 - p), 0.0) / n)
    return f"{p:.3f} ± {se:.3f}"


def scored_count(summary: dict, metric: str) -> int:
    """How many edits a final share was taken over."""
    if metric.startswith("retention_"):
        return summary["retention_first_k"]
    return summary["config"]["num_edits"]


def row(name: str, summary: dict, values: dict) -> list[str]:
    cells = [name] + [with_se(values.get(m), scored_count(summary, m), values.get(m + "_se"))
                      for m in SHARES]
    cells.append(f"{values['perplexity']:.0f}" if values.get("perplexity") else "")
    cells += [f"{values[c]:.3g}" if values.get(c) is not None else "" for c in CAP]
    cells.append(f"{values['fluency']:.2f}" if values.get("fluency") is not None else "")
    return cells


def table(cells: dict[str, dict]) -> str:
    first = next(iter(cells.values()))
    k = first["retention_first_k"]
    header = ["cell", "efficacy", "generalization", "specificity", "neighbourhood specificity",
              f"first-{k} efficacy",
              "held-out token ppl", "held-out word ppl (lm-eval, older runs)", "SST-2 acc", "AG News acc",
              "fluency", "anchor deviation", "unconverged values",
              "mean ‖δ‖/‖z‖", "edits/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| " + " | ".join(row("unedited", first, first["unedited"]) + [""] * 4) + " |")
    for name, s in cells.items():
        final = s["final"]
        extra = [f"{final['anchor_deviation']:.3f}",
                 f"{final.get('unconverged_fraction', float('nan')):.3f}",
                 f"{final.get('all_delta_ratio_mean', float('nan')):.2f}",
                 f"{s['edits_per_second']:.3f}"]
        lines.append("| " + " | ".join(row(name, s, final) + extra) + " |")
    return "\n".join(lines)


def curve_label(summary: dict) -> str:
    """The trade-off plot's line of a cell: its editor kind, its edit layers when the cell
    has more than one, and its value optimizer when not Adam ("rls L2-6 ngd")."""
    kind = summary["editor_settings"]["kind"]
    layers = summary.get("edit_layers") or []
    label = kind if len(layers) < 2 else f"{kind} L{layers[0]}-{layers[-1]}"
    optimizer = summary.get("config", {}).get("values", {}).get("optimizer", "adam")
    return label if optimizer == "adam" else f"{label} {optimizer}"


def plot_tradeoff(cells: dict[str, dict], path: str, metric: str = "efficacy") -> Path:
    """`metric` (efficacy, generalization, ...) against held-out perplexity, one line per
    `curve_label` through its settings in order of perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    kinds: dict[str, list] = {}
    for name, s in cells.items():
        kind = s["editor_settings"]["kind"]
        setting = s["editor_settings"].get(SETTING_KEY.get(kind, ""), None)
        kinds.setdefault(curve_label(s), []).append((setting or 0.0, s["final"].get("perplexity"),
                                                     s["final"][metric], name))
    for kind, points in sorted(kinds.items()):
        points = sorted((p for p in points if p[1] is not None), key=lambda p: p[1])
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=kind)
        for _, ppl, eff, name in points:
            ax.annotate(name.split("-", 2)[-1].removesuffix("-s0"), (ppl, eff), fontsize=7)
    base = next(iter(cells.values()))["unedited"]
    ax.axvline(base["perplexity"], color="grey", linestyle="--", linewidth=1,
               label="unedited perplexity")
    ax.axvline(1.1 * base["perplexity"], color="grey", linestyle=":", linewidth=1,
               label="unedited + 10% (issue 13's bound)")
    ax.set_xlabel("held-out token perplexity (lower is better)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid-dir", nargs="+", required=True)
    parser.add_argument("--plot", help="write the trade-off plot to this PNG")
    parser.add_argument("--plot-metric", default="efficacy", choices=SHARES,
                        help="the plot's vertical axis")
    parser.add_argument("--heading", default="Fidelity sweep")
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    parser.add_argument("--skip", nargs="+", default=[], metavar="TEXT",
                        help="leave out cells whose name contains any of these")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also the paired difference A − B edit by edit (cell names or "
                             "unique parts of them; repeat for more pairs)")
    args = parser.parse_args(argv)
    cells = read_cells(args.grid_dir, args.skip)
    body = table(cells)
    if args.pair:
        body += "\n\n" + paired_rows(cells, args.pair)
    if args.plot:
        shown = Path(args.plot)
        shown = shown.relative_to("docs") if shown.is_relative_to("docs") else shown.resolve()
        body += f"\n\n![{args.plot_metric} against held-out perplexity]({shown})"
        plot_tradeoff(cells, args.plot, args.plot_metric)
    publish(body, args.append, args.heading, "bench.sweep_report", argv)


if __name__ == "__main__":
    main()
