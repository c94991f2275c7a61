"""A cell's table and curves read from its own files, on a real 12-edit stream."""

from bench.cell_curves import main, read_cell, table
from pipelines.edit_stream import parse_args as stream_config, run_stream
from tests.pipelines.conftest import stream_args


def test_the_cell_so_far_is_what_the_stream_logged(tmp_path, capsys):
    out = tmp_path / "cell"
    summary = run_stream(stream_config(stream_args(out)))

    cell = read_cell(str(out))
    assert cell["position"] == 12
    assert [h["edits"] for h in cell["history"]] == [5, 10, 12]
    for got, want in zip(cell["history"], summary["history"]):
        assert got["efficacy"] == want["efficacy"]
        assert got["edits_per_second"] == want["edits_per_second"]
    assert cell["unedited"]["efficacy"] == summary["unedited"]["efficacy"]

    rows = table({"cell": cell}).splitlines()
    assert rows[0].startswith("| cell, edits | efficacy | generalization | specificity | first-100")
    assert len(rows) == 2 + 1 + 3   # header, rule, unedited, three points
    last = summary["history"][-1]
    assert rows[-1].startswith(f"| cell 12 | {last['efficacy']:.3f} ± {last['efficacy_se']:.3f} |")
    assert rows[-1].endswith(f"| {1 / last['edits_per_second']:.2f} |")

    png = tmp_path / "curves.png"
    main([str(out), str(out), "--plot", str(png)])   # the same cell twice: one name, one line
    assert png.stat().st_size > 0
    assert "cell: 12 edits applied in" in capsys.readouterr().out
