"""Bad input never corrupts a model silently: a target the tokenizer drops, records skipped
only when asked (then counted and logged), NaN keys from a broken model, an ill-conditioned
P. (Malformed and duplicate records, the subject missing from its prompt and the fuzz test
are in test_data.py; unknown models, layers, editors and config typos in
pipelines/test_edit_stream.py and test_grid.py.)"""

import json

import mlflow
import pytest
import torch

from pipelines.edit_stream import parse_args, run_stream
from tasks.data import EditRecordError, load_requests, parse_record
from tasks.edit_step import EditBatchError
from tasks.editors.rls import RLSLayerState
from tasks.extract.prompts import check_request_tokens
from tasks.stream import EditStream
from tests.conftest import EDIT_DATA
from tests.pipelines.test_edit_stream import tiny_args
from tests.test_data import GOOD


def word_tokenizer():
    """A real fast tokenizer whose normaliser deletes control characters (BERT's clean_text),
    as some tokenizers do: a target made of them tokenises to nothing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] [PAD] The mother tongue of Danielle Darrieux is English French".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=False,
                                                    handle_chinese_chars=False,
                                                    strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_a_target_that_tokenises_to_nothing_is_refused_naming_the_record(tmp_path):
    tokenizer = word_tokenizer()
    check_request_tokens(tokenizer, parse_record(GOOD))          # a normal record passes
    empty_target = parse_record({**GOOD, "target_new": "\x01\x02"})
    with pytest.raises(ValueError, match=r"target_new '\\x01\\x02' .* tokenises to nothing"):
        check_request_tokens(tokenizer, empty_target)

    path = tmp_path / "edits.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "case_id": 8, "target_new": "\x01\x02"}]))
    check = lambda request: check_request_tokens(tokenizer, request)  # noqa: E731
    with pytest.raises(EditRecordError, match=r"record 1 \(case_id=8\): target_new .* nothing"):
        load_requests(path, check=check)


def test_skip_mode_lists_each_bad_record_and_reads_on_to_fill_the_stream(tmp_path):
    records = [GOOD, {**GOOD, "case_id": 8, "subject": "Catherine Deneuve"}, {**GOOD},
               {**GOOD, "case_id": 9, "target_new": "\x01"}, {**GOOD, "case_id": 10}, "junk",
               {**GOOD, "case_id": 11}]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(records))
    tokenizer = word_tokenizer()
    skipped = []
    requests = load_requests(path, limit=3, check=lambda r: check_request_tokens(tokenizer, r),
                             skipped=skipped)
    assert [r.case_id for r in requests] == [7, 10, 11]
    assert [(s.index, s.case_id) for s in skipped] == [(1, 8), (2, 7), (3, 9), (5, None)]
    reasons = [s.reason for s in skipped]
    assert "does not occur in prompt" in reasons[0] and "duplicate case_id" in reasons[1]
    assert "tokenises to nothing" in reasons[2] and "expected an object" in reasons[3]
    with pytest.raises(EditRecordError, match="holds only 3 good records"):
        load_requests(path, limit=4, check=lambda r: check_request_tokens(tokenizer, r),
                      skipped=[])


def bad_data(tmp_path):
    """The first 6 training records with a subject-less one spliced in at index 2."""
    records = json.loads(EDIT_DATA.read_text())[:6]
    broken = {**records[2], "case_id": "broken", "subject": "Nobody In This Prompt"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records[:2] + [broken] + records[2:]))
    return path


def test_a_bad_record_stops_the_stream_before_any_edit(tmp_path):
    args = tiny_args(tmp_path, "--data", str(bad_data(tmp_path)))
    with pytest.raises(EditRecordError,
                       match=r"record 2 \(case_id=broken\): subject 'Nobody In This Prompt'"):
        run_stream(parse_args(args))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_skip_mode_edits_the_good_records_and_logs_what_it_skipped(tmp_path):
    args = tiny_args(tmp_path, "--data", str(bad_data(tmp_path)), "--set", "skip_bad_records=true")
    summary = run_stream(parse_args(args))
    assert [r["case_id"] for r in summary["skipped_records"]] == ["broken"]
    assert summary["history"][-1]["edits"] == 6        # still 6 edits: one more record read
    client = mlflow.MlflowClient()
    run_id = summary["mlflow_run_id"]
    assert client.get_metric_history(run_id, "skipped_records")[0].value == 1
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/skipped_records.json")
    assert "does not occur in prompt" in logged["skipped"][0]["reason"]


def test_nan_keys_from_a_broken_model_stop_the_batch_and_leave_the_state(tmp_path):
    stream = EditStream(parse_args(tiny_args(tmp_path)))
    with torch.no_grad():   # a corrupt weight below the edit layer: every key turns NaN
        stream.lm.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    W_before = stream.editor.weight(1).clone()
    layer_before = stream.lm.mlp_out(1).weight.detach().clone()
    with pytest.raises(EditBatchError, match=r"at layer 1: K holds \d+ NaN/Inf values"):
        stream.step()
    assert stream.position == 0
    assert torch.equal(stream.editor.weight(1), W_before)
    assert torch.equal(stream.lm.mlp_out(1).weight, layer_before)


def test_an_update_that_would_break_p_is_refused_and_leaves_the_state():
    state = RLSLayerState.init(torch.zeros(4, 2), torch.zeros(4, 4), lam=1.0, mu=0.0,
                               dtype=torch.float32)
    key = torch.zeros(1, 4)
    key[0, 0] = 1e5       # kPkᵀ = 1e10: in float32 the downdate cancels P[0, 0] to zero
    P_before, W_before = state.P.clone(), state.W.clone()
    with pytest.raises(ValueError, match="non-positive diagonal entries .* ill-conditioned"):
        state.update(key, torch.ones(1, 2))
    assert torch.equal(state.P, P_before) and torch.equal(state.W, W_before)
    state64 = RLSLayerState.init(torch.zeros(4, 2), torch.zeros(4, 4), lam=1.0, mu=0.0)
    state64.update(key, torch.ones(1, 2))   # float64 keeps it: 1 − 1e10/(1 + 1e10) > 0
    assert state64.P[0, 0] > 0
