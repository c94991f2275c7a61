"""The key-space reach of one write, on the tiny Llama with real CounterFact prompts."""

from dataclasses import replace

import torch

from bench.neighbour_bleed import edit_keys, reach, write_inverses
from tasks.data import load_requests
from tasks.extract.keys import compute_keys
from tasks.extract.prompts import prompt_batch
from tests.conftest import EDIT_DATA


def test_edit_keys_are_the_editors_keys(tiny):
    requests = load_requests(EDIT_DATA, limit=3)
    batch = prompt_batch(tiny.tokenizer, requests)
    keys, _ = compute_keys(tiny, 1, batch, torch.arange(3), 3, mode="rows")
    torch.testing.assert_close(edit_keys(tiny, [1], requests)[1], keys.double())


def test_a_prompt_sees_all_of_its_own_write(tiny):
    """With the edit's own prompt as its paraphrase the share at the subject is exactly 1,
    so the largest share is at least 1, whatever P; other prompts get one finite share each."""
    requests = [replace(r, rephrase_prompts=(r.prompt,)) for r in load_requests(EDIT_DATA, limit=3)]
    P = write_inverses(tiny, [1], lam=1.0, mu=130.0)
    own = reach(tiny, [1], requests, P, "rephrase_prompts")[1]
    assert own.shape == (3,) and (own >= 1 - 1e-9).all()
    other = reach(tiny, [1], requests, P, "locality_prompts")[1]
    assert ((other >= 0) & torch.isfinite(other)).all()
    plain = reach(tiny, [1], requests, {1: torch.eye(P[1].shape[0], dtype=torch.float64)},
                  "rephrase_prompts")[1]
    assert (plain >= 1 - 1e-9).all()      # P = I: kᵀk_e / k_eᵀk_e, 1 at k = k_e
