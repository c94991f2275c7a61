"""Neighbourhood prompts: same relation template and true object, never an edited record."""

import json

import torch

from tasks.data import load_requests
from tasks.evaluate.metrics import aggregate, score_requests
from tasks.evaluate.neighbours import (NeighbourArgs, pick_neighbours, relation_template,
                                       with_neighbours)
from tests.conftest import EDIT_DATA


def test_neighbours_share_the_relation_and_the_true_object():
    pool = load_requests(EDIT_DATA)
    requests = pool[:200]
    picked = pick_neighbours(requests, pool, per_edit=10, seed=0)
    by_prompt = {}
    for record in pool:                      # a few prompts occur in several records
        by_prompt.setdefault(record.prompt, []).append(record)
    edited = {r.case_id for r in requests}
    assert sum(bool(p) for p in picked) > 100       # most edits have some (74% on the file)
    assert max(len(p) for p in picked) == 10
    for request, prompts in zip(requests, picked):
        for prompt in prompts:
            assert any(n.case_id not in edited and n.subject != request.subject
                       and n.ground_truth == request.ground_truth
                       and relation_template(n.prompt, n.subject)
                       == relation_template(request.prompt, request.subject)
                       for n in by_prompt[prompt])
    assert pick_neighbours(requests, pool, 10, seed=0) == picked      # fixed by seed
    assert pick_neighbours(requests, pool, 10, seed=1) != picked


def test_neighbours_are_cached_and_scored(tiny, isolated_stores):
    requests = load_requests(EDIT_DATA, limit=30)
    args = NeighbourArgs(pool=str(EDIT_DATA), per_edit=3)
    folder = isolated_stores / "cache" / "neighbours"
    before = set(folder.glob("*.json"))                 # other tests' streams cache theirs
    filled = with_neighbours(requests, args, seed=0)
    cached = list(set(folder.glob("*.json")) - before)
    assert len(cached) == 1
    assert [list(r.neighbour_prompts) for r in filled] == json.loads(cached[0].read_text())
    assert with_neighbours(requests, args, seed=0) == filled
    assert with_neighbours(requests, NeighbourArgs(pool=""), seed=0) == requests
    scores = score_requests(tiny, filled)
    have = [s for r, s in zip(filled, scores) if r.neighbour_prompts]
    assert have and all(0 <= s["specificity_nbhd"] <= 1 for s in have)
    assert all(s["specificity_nbhd"] != s["specificity_nbhd"]            # NaN: none to score
               for r, s in zip(filled, scores) if not r.neighbour_prompts)
    out = aggregate(scores)
    assert out["specificity_nbhd_edits"] == len(have)
    assert torch.isfinite(torch.tensor(out["specificity_nbhd"]))
