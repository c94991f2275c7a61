"""Paraphrase keys against the written keys, on a real 12-edit stream of the tiny model."""

import json

import pytest
import torch

from bench.rephrase_keys import key_cosines, main, subject_place
from pipelines.edit_stream import parse_args as stream_config, run_stream
from tasks.data import load_requests
from tasks.extract.prompts import make_context_templates
from tasks.models import load_model
from tests.conftest import EDIT_DATA
from tests.pipelines.conftest import stream_args


def test_where_a_paraphrase_puts_the_subject():
    assert subject_place("Apple A5 is sold by", "Apple A5") == "subject first"
    assert subject_place("It rained. Apple A5 is sold by", "Apple A5") == "after a sentence"
    assert subject_place("The maker of Apple A5 is", "Apple A5") == "after other words"


def test_a_paraphrase_that_opens_with_the_subject_has_the_bare_prompts_key():
    """Keys are causal: where both the bare prompt and the paraphrase open with the subject,
    the paraphrase's key is the bare prompt's, largest cosine 1."""
    torch.manual_seed(0)
    lm = load_model("tiny-llama")
    requests = [r for r in load_requests(EDIT_DATA, limit=60)
                if r.prompt.startswith(r.subject) and r.rephrase_prompts[0].startswith(r.subject)]
    assert len(requests) >= 3
    templates = make_context_templates(lm, 2, 5, seed=0)
    cosines = key_cosines(lm, lm.spec.edit_layers[-1], requests[:3], templates)
    for to_row, largest in cosines:
        assert largest == pytest.approx(1.0, abs=1e-5) and to_row <= largest + 1e-6


def test_the_table_groups_every_edit_of_a_finished_cell(tmp_path, capsys):
    out = tmp_path / "cell"
    run_stream(stream_config(stream_args(out)))
    main([str(out), "--model", "tiny-llama", "--layer", "0"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| paraphrases | edits | generalization | period: ")
    counts = {row.split(" | ")[0][2:]: int(row.split(" | ")[1]) for row in rows[2:]}
    places = ("subject first", "after a sentence", "after other words")
    scored = len(json.loads((out / "final_scores.json").read_text())["edits"])
    assert sum(counts.get(p, 0) for p in places) == scored == 12
    assert sum(n for name, n in counts.items() if name.startswith("largest cosine")) == 12
