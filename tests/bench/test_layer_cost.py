"""Each edited layer's share, rescored from a real 6-edit stream over two layers: the whole
edit scores what the stream logged (the capability suite included), and with two layers
"all but one" is "only the other"."""

import json

import torch

from bench.layer_cost import evenly_spread, layer_of, measure, table, top_shares, without_top
from pipelines.edit_stream import parse_args as stream_config, run_stream
from tests.pipelines.conftest import stream_args


def test_layer_sets_score_what_the_stream_logged(tmp_path):
    out = tmp_path / "cell"
    summary = run_stream(stream_config(stream_args(out) + [
        "--set", "layers=[0,1]", "--num-edits", "6", "--eval-every", "6",
        "--set", "heldout.n_texts=10", "--set", "capability.profile=cpu",
        "--set", "capability.limit=4"]))
    cache = tmp_path / "layers.json"
    results = measure(out, 6, cache)

    assert list(results) == ["unedited", "all", "all but L0", "all but L1", "only L0", "only L1"]
    for metric in ("efficacy", "generalization", "specificity", "perplexity"):
        assert results["all"][metric] == summary["final"][metric]
        assert results["unedited"][metric] == summary["unedited"][metric]
        assert results["all but L0"][metric] == results["only L1"][metric]
    assert results["all"]["perplexity"] != results["unedited"]["perplexity"]

    assert json.loads(cache.read_text())[f"{out.resolve()} edits=6"] == results
    rows = table(results).splitlines()
    assert rows[0] == "| weights | held-out token ppl | efficacy | generalization | specificity |"
    assert len(rows) == 2 + 6

    with_tasks = measure(out, 6, cache, per_layer=False, capability_limit=4)
    for task in ("rlsedit_sst2.acc", "rlsedit_agnews.acc"):
        assert with_tasks["all"][task] == summary["final"][f"cap.{task}"]
        assert with_tasks["unedited"][task] == summary["unedited"][f"cap.{task}"]
    assert f"{out.resolve()} edits=6 capability=4" in json.loads(cache.read_text())
    assert table(with_tasks, 4).splitlines()[0].endswith("| specificity | SST-2 | AG News |")

    at_six = measure(out, 6, cache, per_layer=False, snapshot=6)   # the last point's snapshot
    assert at_six == {label: results[label] for label in ("unedited", "all")}


def test_spread_and_layer_names():
    assert evenly_spread(5, 10) == [0, 1, 2, 3, 4]
    assert evenly_spread(1000, 5) == [0, 250, 500, 749, 999]
    assert layer_of("model.layers.12.mlp.down_proj.weight") == 12


def test_top_directions_out_of_a_rank_two_change():
    name = "model.layers.3.mlp.down_proj.weight"
    gen = torch.Generator().manual_seed(0)
    unedited = {name: torch.randn(6, 8, generator=gen)}
    big, small = torch.zeros(6, 8), torch.zeros(6, 8)
    big[0, 0], small[1, 1] = 3.0, 1.0             # singular values 3 and 1
    edited = {name: unedited[name] + big + small}

    sets = without_top(edited, unedited, [1, 2])
    assert torch.allclose(sets["all, top 1 out"][name], unedited[name] + small, atol=1e-6)
    assert torch.allclose(sets["all, top 2 out"][name], unedited[name], atol=1e-6)
    assert top_shares(edited, unedited, [1, 2]) == {name: [0.9, 1.0]}
