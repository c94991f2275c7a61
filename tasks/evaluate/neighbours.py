"""Neighbourhood prompts for specificity, built as ROME built CounterFact's.

An edit's neighbours are other subjects that share its relation and its true object: a
record's relation template is its prompt with the subject taken out ("{} plays the"), and
its neighbours are records of a pool (`counterfact-train.json`, whose records no stream
of this file edits) with the same template and the same `ground_truth`. A neighbour's
prompt should still end in that true object after the edit; `specificity_nbhd` scores
P(ground_truth) > P(target_new) on each (`tasks/evaluate/metrics.py`).

Up to `per_edit` neighbours per edit, drawn by seed, cached on disk per stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.data import EditRequest, load_requests
from tasks.errors import require_file
from tasks.files import write_atomically
from tasks.models import cache_root

log = logging.getLogger(__name__)
POOL_FIX = "set neighbours.pool to a CounterFact file, or to '' for no neighbourhood prompts"


@dataclass
class NeighbourArgs:
    pool: str = "../shared/data/counterfact/counterfact-train.json"   # "": no neighbours
    per_edit: int = 10


def relation_template(prompt: str, subject: str) -> str:
    """`prompt` with the first occurrence of `subject` replaced by "{}"."""
    return prompt.replace(subject, "{}", 1)


def pool_index(pool: list[EditRequest]) -> dict[tuple[str, str], list[EditRequest]]:
    """Pool records grouped by (relation template, true object)."""
    index: dict[tuple[str, str], list[EditRequest]] = {}
    for record in pool:
        key = (relation_template(record.prompt, record.subject), record.ground_truth)
        index.setdefault(key, []).append(record)
    return index


def pick_neighbours(requests: list[EditRequest], pool: list[EditRequest], per_edit: int,
                    seed: int) -> list[list[str]]:
    """For each request, the prompts of up to `per_edit` pool records with its template and
    true object, none of them a record the stream edits (by case_id) nor of its subject."""
    index = pool_index(pool)
    edited = {request.case_id for request in requests}
    rng = random.Random(seed)
    picked = []
    for request in requests:
        key = (relation_template(request.prompt, request.subject), request.ground_truth)
        candidates = [r.prompt for r in index.get(key, [])
                      if r.case_id not in edited and r.subject != request.subject]
        picked.append(rng.sample(candidates, min(per_edit, len(candidates))))
    return picked


def with_neighbours(requests: list[EditRequest], args: NeighbourArgs,
                    seed: int) -> list[EditRequest]:
    """`requests` with `neighbour_prompts` filled (see the module docstring); the same
    requests when `args.pool` is empty. Logs how many edits have no neighbour."""
    if not args.pool or not requests:
        return requests
    path = Path(args.pool)
    require_file(path, "neighbour pool", POOL_FIX)
    key = json.dumps([hashlib.sha1(path.read_bytes()).hexdigest(), args.per_edit, seed,
                      [(r.case_id, r.prompt, r.subject, r.ground_truth) for r in requests]])
    cache = cache_root() / "neighbours" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if cache.exists():
        picked = json.loads(cache.read_text())
    else:
        picked = pick_neighbours(requests, load_requests(path), args.per_edit, seed)
        write_atomically(cache, lambda tmp: tmp.write_text(json.dumps(picked)))
    alone = sum(not prompts for prompts in picked)
    log.info("neighbourhood prompts: %d edits of %d have none in %s", alone, len(requests),
             path.name)
    return [replace(r, neighbour_prompts=tuple(prompts)) for r, prompts in zip(requests, picked)]
