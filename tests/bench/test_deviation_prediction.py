"""`bench.deviation_prediction`'s table of budget cells, from what a cell logged: one row
per edit layer with its chosen μ, the predicted and the measured deviations."""

from bench.deviation_prediction import budget_rows, budget_table


def budget_summary():
    point = lambda edits, d2, d3: {"edits": edits, "anchor_deviation": (d2 + d3) / 2,  # noqa: E731
                                   "anchor_deviation.L2": d2, "anchor_deviation.L3": d3}
    history = [{"edits": 0}, point(250, 0.002, 0.01), point(500, 0.004, 0.025)]
    final = {**history[-1], "budget_mu.L2": 0.001, "budget_predicted_deviation.L2": 0.01,
             "budget_mu.L3": 576.29, "budget_predicted_deviation.L3": 0.05}
    return {"editor_settings": {"kind": "rls", "deviation_budget": 0.05}, "edit_layers": [2, 3],
            "history": history, "final": final}


def test_budget_rows_put_prediction_beside_every_measurement():
    rows = budget_rows("cell", budget_summary())
    assert rows == [["cell", "2", "0.05", "0.001", "0.0100", "0.0020 / 0.0040", "2.50"],
                    ["cell", "3", "0.05", "576.3", "0.0500", "0.0100 / 0.0250", "2.00"]]
    text = budget_table({"cell": budget_summary()})
    assert "| cell (250, 500 edits) | 3 | 0.05 | 576.3 |" in text
    assert text.count("\n") == 3   # header, rule, two layers
