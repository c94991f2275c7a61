"""The first and last edits of a real 12-edit stream, rescored from its stored snapshots:
the same scores the stream logged at each point as retention_ and recent_."""

import json

from bench.write_vs_keep import labels, measure, table
from pipelines.edit_stream import parse_args as stream_config, run_stream
from tests.conftest import EDIT_DATA
from tests.pipelines.conftest import stream_args


def test_snapshot_windows_equal_what_the_stream_logged(tmp_path):
    out = tmp_path / "cell"
    summary = run_stream(stream_config(stream_args(out) + ["--set", "retention_edits=3",
                                                         "--set", "recent_edits=3"]))
    cache = tmp_path / "windows.json"
    results = measure([str(out)], "tiny-llama", str(EDIT_DATA), 3, cache)

    points = results["cell"]
    assert sorted(points, key=int) == ["5", "10", "12"]
    for logged in summary["history"]:
        scored = points[str(logged["edits"])]
        for metric in ("efficacy", "generalization"):
            assert scored[f"first_{metric}"] == logged[f"retention_{metric}"]
            assert scored[f"last_{metric}"] == logged[f"recent_{metric}"]
            assert scored[f"last_{metric}_se"] == logged[f"recent_{metric}_se"]

    assert json.loads(cache.read_text())[f"{out.resolve()} window=3"] == points
    assert measure([str(out)], "no-such-model", str(EDIT_DATA), 3, cache) == results  # cached
    rows = table(results, 3).splitlines()
    assert rows[0] == ("| cell, edits | first-3 efficacy | last-3 efficacy | first-3 generalization "
                       "| last-3 generalization |")
    assert len(rows) == 2 + 3


def test_cells_of_one_name_in_two_grids_keep_apart():
    assert labels(["/runs/a/cells/m-rlsedit-s0", "/runs/b/cells/m-rlsedit-s0", "/runs/a/cells/x"]) \
        == {"/runs/a/cells/m-rlsedit-s0": "a/m-rlsedit-s0", "/runs/b/cells/m-rlsedit-s0": "b/m-rlsedit-s0",
            "/runs/a/cells/x": "x"}
