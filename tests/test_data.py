import json
import random

import pytest

from tasks.data import EditRecordError, load_requests, parse_record
from tasks.errors import UserError
from tests.conftest import DATA

GOOD = {
    "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
    "target_new": "English", "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard speaks",
    "locality_ground_truth": "French",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["Danielle Darrieux speaks", "Danielle Darrieux writes in"],
    "neighborhood_prompts": ["Michel Rocard speaks"],
}


def test_both_formats_give_the_same_request():
    easy, rome = parse_record(GOOD), parse_record(ROME)
    assert easy.prompt == rome.prompt == "The mother tongue of Danielle Darrieux is"
    assert easy.target_new == rome.target_new == "English"
    assert rome.rephrase_prompts == ("Danielle Darrieux speaks", "Danielle Darrieux writes in")
    assert rome.locality_ground_truth == "French"
    assert easy.subject_end == len("The mother tongue of Danielle Darrieux")


def test_the_shared_counterfact_files_load_whole():
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        requests = load_requests(DATA / "counterfact" / name)
        assert len(requests) == 10_000
        assert all(r.rephrase_prompts and r.locality_prompts for r in requests)


@pytest.mark.parametrize("change,message", [
    ({"subject": "Catherine Deneuve"}, "does not occur in prompt"),
    ({"target_new": "  "}, "field 'target_new' is empty"),
    ({"ground_truth": None}, "field 'ground_truth' is empty or not a string"),
    ({"target_new": "French"}, "target_new equals ground_truth"),
    ({"rephrase_prompt": ["ok", ""]}, "rephrase_prompts holds an empty"),
])
def test_bad_records_name_the_record_and_the_problem(change, message):
    record = {**GOOD, **change}
    with pytest.raises(EditRecordError, match=message) as err:
        parse_record(record, index=12)
    assert "record 12 (case_id=7)" in str(err.value)


def test_missing_field_and_non_object(tmp_path):
    record = dict(GOOD)
    del record["subject"]
    with pytest.raises(EditRecordError, match="record 0 .*missing or malformed field 'subject'"):
        parse_record(record)
    with pytest.raises(EditRecordError, match="record 3: expected an object, got list"):
        parse_record([1, 2], index=3)
    with pytest.raises(EditRecordError, match="no '\\{\\}' placeholder"):
        parse_record({**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "prompt": "x"}})


def test_file_level_errors(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "prompt": "Where Danielle Darrieux lives is"}]))
    with pytest.raises(EditRecordError, match="record 1 \\(case_id=7\\): duplicate case_id"):
        load_requests(path)
    with pytest.raises(EditRecordError, match="asked for 5 records"):
        load_requests(DATA / "counterfact" / "counterfact-edit.json", limit=5, offset=9_998)
    path.write_text("{not json")
    with pytest.raises(EditRecordError, match="neither a JSON list nor JSON lines"):
        load_requests(path)
    with pytest.raises(UserError, match="cannot read edit data .*missing.json: no such file"):
        load_requests(tmp_path / "missing.json")
    path.write_bytes('[{"prompt": "Caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 16 is 0xe9\): save it as"):
        load_requests(path)


def test_a_prompt_or_answer_over_the_cap_is_a_bad_record_naming_the_limit():
    long = {**GOOD, "locality_prompt": "x" * 1001}
    assert parse_record(long).locality_prompts == ("x" * 1001,)   # no cap unless asked
    with pytest.raises(EditRecordError, match=r"record 3 \(case_id=7\): locality_prompts is "
                                              r"1,001 characters long, over the limit of 1,000"):
        parse_record(long, 3, max_chars=1000)
    parse_record({**GOOD, "target_new": "y" * 50}, max_chars=50)   # the limit itself passes


def test_json_lines_are_read(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "case_id": i}) for i in range(3)))
    assert [r.case_id for r in load_requests(path)] == [0, 1, 2]


def test_fuzzed_records_either_parse_or_raise_edit_record_error():
    rng = random.Random(0)
    values = [None, "", " ", "x", 3, [], ["a"], {"str": "y"}, "Danielle Darrieux", 1.5]
    for _ in range(500):
        record = dict(GOOD)
        for key in rng.sample(sorted(GOOD), rng.randint(1, 4)):
            if rng.random() < 0.3:
                record.pop(key)
            else:
                record[key] = rng.choice(values)
        try:
            request = parse_record(record)
        except EditRecordError:
            continue
        assert request.subject in request.prompt and request.target_new.strip()


def test_aggregate_gives_each_metric_its_standard_error():
    from tasks.evaluate.metrics import METRIC_NAMES, aggregate

    scores = [{name: float(i % 4 == 0) for name in METRIC_NAMES} for i in range(100)]
    scores[0]["generalization"] = float("nan")      # no rephrase prompt: left out
    out = aggregate(scores, "retention_")
    assert out["retention_efficacy"] == 0.25
    assert abs(out["retention_efficacy_se"] - (0.25 * 0.75 / 100) ** 0.5) < 1e-12
    p = 24 / 99
    assert abs(out["retention_generalization"] - p) < 1e-12
    assert abs(out["retention_generalization_se"] - (p * (1 - p) / 99) ** 0.5) < 1e-12
