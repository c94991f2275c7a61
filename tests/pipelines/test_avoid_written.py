"""`values.avoid_written` in a stream: before any edit nothing is avoided; after a batch the
avoided direction is the written change's top output direction at the value layer, and the
next batch's deltas are orthogonal to it."""

import torch

from pipelines.edit_stream import parse_args as stream_config
from tasks.extract import values
from tasks.stream import EditStream
from tests.pipelines.conftest import stream_args


def test_the_next_deltas_avoid_what_the_stream_wrote_most(tmp_path, monkeypatch):
    args = stream_args(tmp_path / "run") + ["--set", "values.avoid_written=1"]
    stream = EditStream(stream_config(args))
    assert stream.avoided_directions() is None
    stream.step()
    layer = stream.layers[-1]
    change = stream.editor.weight(layer).double() - stream.W0[layer].double()
    avoid = stream.avoided_directions()                                      # [1, d_v]
    assert avoid.shape == (1, change.shape[1])
    torch.testing.assert_close((change @ avoid[0]).norm(), torch.linalg.svdvals(change)[0])

    written = []
    original = values.compute_target_values
    monkeypatch.setattr("tasks.edit_step.compute_target_values",
                        lambda *a, **k: written.append(original(*a, **k)) or written[-1])
    stream.step()
    delta = written[0].delta.double()
    assert (delta @ avoid[0]).abs().max() < 1e-4 * delta.norm(dim=1).max()

    plain = EditStream(stream_config(stream_args(tmp_path / "plain")))
    plain.step()
    assert plain.avoided_directions() is None
