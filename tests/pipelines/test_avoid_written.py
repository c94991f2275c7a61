"""`values.avoid_written` in a stream: before any edit nothing is avoided; after a batch the
avoided direction is the written change's top output direction at the value layer, and the
next batch's deltas are orthogonal to it; with `avoid_on: writes` every layer's next change
is orthogonal to that layer's own direction."""

import torch

from pipelines.edit_stream import parse_args as stream_config
from tasks.extract import values
from tasks.stream import EditStream
from tests.pipelines.conftest import stream_args


def written(stream, layer):
    return stream.editor.weight(layer).double() - stream.W0[layer].double()


def test_the_next_deltas_avoid_what_the_stream_wrote_most(tmp_path, monkeypatch):
    args = stream_args(tmp_path / "run") + ["--set", "values.avoid_written=1"]
    stream = EditStream(stream_config(args))
    assert stream.avoided_directions() == {}
    stream.step()
    layer = stream.layers[-1]
    avoid = stream.avoided_directions()
    assert list(avoid) == [layer] and avoid[layer].shape == (1, written(stream, layer).shape[1])
    torch.testing.assert_close((written(stream, layer) @ avoid[layer][0]).norm(),
                               torch.linalg.svdvals(written(stream, layer))[0])

    targets = []
    original = values.compute_target_values
    monkeypatch.setattr("tasks.edit_step.compute_target_values",
                        lambda *a, **k: targets.append(original(*a, **k)) or targets[-1])
    stream.step()
    delta = targets[0].delta.double()
    assert (delta @ avoid[layer][0]).abs().max() < 1e-4 * delta.norm(dim=1).max()

    plain = EditStream(stream_config(stream_args(tmp_path / "plain")))
    plain.step()
    assert plain.avoided_directions() is None


def test_every_layer_writes_away_from_its_own_direction(tmp_path):
    args = stream_args(tmp_path / "run") + ["--set", "values.avoid_written=1", "--set",
                                            "values.avoid_on=writes", "--set", "layers=[0,1]"]
    stream = EditStream(stream_config(args))
    stream.step()
    avoid = stream.avoided_directions()
    assert sorted(avoid) == [0, 1]
    before = {layer: written(stream, layer) for layer in avoid}
    stream.step()
    for layer, direction in avoid.items():
        step_change = written(stream, layer) - before[layer]                 # [d_k, d_v]
        assert step_change.norm() > 0
        assert (step_change @ direction[0]).norm() < 1e-6 * step_change.norm(), layer
