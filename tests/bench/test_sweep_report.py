"""The sweep report's table and trade-off plot on hand-made cell summaries."""

import json

from bench.sweep_report import curve_label, plot_tradeoff, read_cells, table


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
