"""`values.rewrite_below` in a stream: every step counts the edits it wrote twice, the
stream keeps their running total in its checkpoint and logs it at evaluation points."""

from pipelines.edit_stream import parse_args as stream_config
from tasks.storage import Location
from tasks.stream import EditStream, read_checkpoint
from tests.pipelines.conftest import stream_args


def test_a_stream_counts_the_edits_it_wrote_twice(tmp_path):
    args = stream_args(tmp_path / "run") + ["--set", "values.rewrite_below=1000"]
    stream = EditStream(stream_config(args))
    for _ in range(3):
        stream.step()        # batch 1: each edit is short of 1,000 nats, so written twice
        assert stream.last_step_stats["rewritten"] == 1
    assert stream.state["rewritten_total"] == 3
    metrics = stream.evaluate()
    assert metrics["rewritten_total"] == 3 and stream.state["history"][-1]["rewritten_total"] == 3
    saved = read_checkpoint(Location(tmp_path / "run" / "checkpoint.pt"))   # after edit 3
    assert saved["rewritten_total"] == 3

    plain = EditStream(stream_config(stream_args(tmp_path / "plain")))
    plain.step()
    assert "rewritten" not in plain.last_step_stats and "rewritten_total" not in plain.state
