"""The sweep report's table and trade-off plot on hand-made cell summaries."""

import json

import pytest

from bench.sweep_report import curve_label, paired_rows, plot_tradeoff, read_cells, table


def summary(kind: str, setting: dict, layers: list[int], efficacy: float, ppl: float) -> dict:
    final = {"efficacy": efficacy, "perplexity": ppl, "anchor_deviation": 0.1,
             "edits": 300}
    return {"final": final, "unedited": {"efficacy": 0.3, "perplexity": 78.0},
            "retention_first_k": 100, "edits_per_second": 0.2, "edit_layers": layers,
            "config": {"num_edits": 300}, "editor_settings": {"kind": kind, **setting}}


def write_grid(root, cells: dict) -> str:
    for name, s in cells.items():
        folder = root / "cells" / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(s))
    return str(root)


def test_a_curve_per_editor_kind_and_layer_span(tmp_path):
    grid = write_grid(tmp_path, {
        "m-rls-a-s0": summary("rls", {"mu": 130}, [6], 0.93, 85.0),
        "m-rls-b-s0": summary("rls", {"mu": 1300}, [6], 0.90, 82.0),
        "m-rls-c-s0": summary("rls", {"mu": 130}, [2, 3, 4, 5, 6], 0.98, 83.0),
        "m-memit-s0": summary("memit", {"cov_weight": 1607}, [6], 0.80, 88.0)})
    cells = read_cells([grid])
    assert [curve_label(s) for s in cells.values()] == ["memit", "rls", "rls", "rls L2-6"]
    # the binomial standard error where a cell logged none: sqrt(.93 * .07 / 300) = 0.015
    assert "| m-rls-a-s0 | 0.930 ± 0.015 |" in table(cells)
    png = plot_tradeoff(cells, str(tmp_path / "tradeoff.png"))
    assert png.stat().st_size > 0
    assert list(read_cells([grid], skip=["rls-b", "memit"])) == ["m-rls-a-s0", "m-rls-c-s0"]


def test_pairs_across_grid_folders(tmp_path):
    """--pair finds cells by a part of their name in any grid folder, labels a name found
    twice by its grid, and pairs each cell's per-edit scores edit by edit."""
    hits = [1.0] * 90 + [0.0] * 10
    misses = [1.0] * 60 + [0.0] * 40
    grids = []
    for grid, (efficacy, scores) in {"grid-a": (0.9, hits), "grid-b": (0.6, misses)}.items():
        cell = {**summary("rls", {"mu": 130}, [6], efficacy, 80.0),   # as a grid cell's
                "final_scores": {"edits": list(range(100)), "efficacy": scores}}
        grids.append(write_grid(tmp_path / grid, {"m-rls-s0": cell}))
    cells = read_cells(grids)
    assert list(cells) == ["m-rls-s0", "grid-b/m-rls-s0"]
    rows = paired_rows(cells, [["m-rls-s0", "grid-b"]])
    assert "| m-rls-s0 − grid-b/m-rls-s0 | +0.300 [" in rows
    assert rows.splitlines()[-1].split("|")[2].strip().endswith("*")   # 30 of 100 edits differ
    with pytest.raises(SystemExit, match="matches 2 cells"):
        paired_rows(cells, [["rls", "grid-b"]])


def test_a_curve_per_value_optimizer_and_a_chosen_vertical_axis(tmp_path):
    ngd = summary("rls", {"mu": 1300}, [2, 3, 4, 5, 6], 0.99, 80.0)
    ngd["config"]["values"] = {"optimizer": "ngd"}
    ngd["final"]["generalization"] = 0.84
    adam = summary("rls", {"mu": 1300}, [2, 3, 4, 5, 6], 0.99, 81.0)
    adam["config"]["values"] = {"optimizer": "adam"}
    adam["final"]["generalization"] = 0.83
    cells = read_cells([write_grid(tmp_path, {"m-a-s0": adam, "m-n-s0": ngd})])
    assert [curve_label(s) for s in cells.values()] == ["rls L2-6", "rls L2-6 ngd"]
    assert plot_tradeoff(cells, str(tmp_path / "gen.png"), "generalization").stat().st_size > 0
