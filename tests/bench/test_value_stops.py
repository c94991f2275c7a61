"""`bench.value_stops` on the tiny Llama: every variant optimises every edit at every batch
size, the table's ratios are against the NLL stop, and --append records the command."""

from bench import docs, value_stops
from tests.conftest import ROOT

ARGS = ["--model", "tiny-llama", "--edits", "2", "--batch-sizes", "1", "2",
        "--variants", "nll", "margin2"]


def test_every_variant_runs_every_edit_and_the_table_records_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(docs, "DOCS", str(tmp_path / "benchmarks.md"))
    value_stops.main(ARGS + ["--append"])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " nll "], [" 1 ", " margin2 "],
                                                  [" 2 ", " nll "], [" 2 ", " margin2 "]]
    assert rows[0].split("|")[4].strip() == "1.00x"
    for row in rows:
        steps = float(row.split("|")[5])
        assert 1 <= steps <= 25
    written = (tmp_path / "benchmarks.md").read_text()
    assert "python -m bench.value_stops --model tiny-llama" in written
    assert written.count("| margin2 |") == 2


def test_tally_sums_over_batches():
    import torch
    from types import SimpleNamespace
    tally = value_stops.Tally()
    assert tally.mean_delta() is None          # a warm start's first batch starts at zero
    assert tally.margin_cells() == " | "    # no margin scored yet: blank cells
    for steps, delta, margin in (([3, 5], [[1.0, 0.0], [3.0, 0.0]], [2.5, 0.5]),
                                 ([25], [[2.0, 6.0]], [float("nan")])):
        n = len(steps)
        tally.add(2.0, SimpleNamespace(steps=torch.tensor(steps), converged=torch.ones(n),
                                       delta_ratio=torch.full((n,), 0.5),
                                       delta=torch.tensor(delta), margin=torch.tensor(margin)))
    assert (tally.seconds, tally.edits, tally.steps, tally.stopped) == (4.0, 3, 33.0, 3.0)
    assert tally.delta_ratio == 1.5
    assert torch.equal(tally.mean_delta(), torch.tensor([2.0, 2.0]))
    assert (tally.margin, tally.margins, tally.under_1) == (3.0, 2, 1)   # NaN: not scored
    assert tally.margin_cells() == "1.50 | 0.50"
