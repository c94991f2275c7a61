"""CounterFact edit requests: load, validate, normalise.

Two on-disk formats are read (a JSON list, or JSON lines):
- EasyEdit's: `prompt` (subject filled in), `subject`, `target_new`, `ground_truth`,
  `rephrase_prompt`, `locality_prompt`, `locality_ground_truth`;
- ROME's original: `requested_rewrite` {`prompt` with "{}", `subject`, `target_new.str`,
  `target_true.str`}, `paraphrase_prompts`, `neighborhood_prompts`.
`hub:NAME[:SPLIT]` loads a dataset from the Hugging Face hub (needs a network).
A bad record raises `EditRecordError` naming its index and case id; nothing is dropped,
unless the caller asks for skip mode, where each bad record is listed with its reason. A
prompt or answer longer than `max_chars` is a bad record: a model's memory grows with the
square of a prompt's length (20,000 characters asked smollm2 for 25.8 GB), and CounterFact's
longest is 163 characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.errors import UserError, brief, read_user_text

MAX_CHARS = 1000   # the default cap on a prompt or answer: 6× CounterFact's longest


class EditRecordError(UserError, ValueError):
    """A record that cannot be turned into an edit request."""


@dataclass(frozen=True)
class EditRequest:
    """One fact edit: make `prompt` continue with `target_new` instead of `ground_truth`.

    `prompt` contains `subject` (its first occurrence is the edited subject); rephrase
    prompts test generalisation, locality prompts (whose answer is `locality_ground_truth`)
    test that unrelated facts stay, neighbour prompts (`tasks/evaluate/neighbours.py`, answer
    `ground_truth`) that the edit stays with its subject.
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    ground_truth: str
    rephrase_prompts: tuple[str, ...]
    locality_prompts: tuple[str, ...]
    locality_ground_truth: str
    neighbour_prompts: tuple[str, ...] = ()   # other subjects, same relation and true object

    @property
    def subject_end(self) -> int:
        """Character offset just past the subject in `prompt`."""
        return self.prompt.index(self.subject) + len(self.subject)


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out in skip mode, and why."""

    index: int
    case_id: object
    reason: str


def load_requests(source: str | Path, limit: int | None = None, offset: int = 0,
                  check: Callable[[EditRequest], None] | None = None,
                  skipped: list[SkippedRecord] | None = None,
                  max_chars: int | None = MAX_CHARS) -> list[EditRequest]:
    """Read `limit` edit requests from record `offset` on, from a file path or
    `hub:NAME[:SPLIT]`. `check(request)` may refuse a parsed request by raising ValueError
    (e.g. one the model's tokenizer cannot mark up); so is one with a prompt or answer
    longer than `max_chars` (None: no cap).

    A bad record (malformed, a repeated case_id, refused by `check`) raises
    `EditRecordError` naming it, unless a `skipped` list is given: then it is appended
    there and reading goes on past `offset + limit` until `limit` good requests are in."""
    records = _read_records(source)
    requests: list[EditRequest] = []
    seen: dict[object, int] = {}
    index = offset
    while index < len(records) and (limit is None or len(requests) < limit):
        try:
            req = parse_record(records[index], index, max_chars)
            if req.case_id in seen:
                raise EditRecordError(
                    f"record {index} (case_id={req.case_id}): duplicate case_id, "
                    f"first seen at record {seen[req.case_id]}")
            if check is not None:
                try:
                    check(req)
                except ValueError as err:
                    raise EditRecordError(
                        f"record {index} (case_id={req.case_id}): {err}") from None
        except EditRecordError as err:
            if skipped is None:
                raise EditRecordError(f"{source}, {err}") from None
            case_id = records[index].get("case_id") if isinstance(records[index], dict) else None
            skipped.append(SkippedRecord(index, case_id, str(err)))
        else:
            seen[req.case_id] = index
            requests.append(req)
        index += 1
    if limit is not None and len(requests) < limit:
        good = "good " if skipped else ""
        raise EditRecordError(
            f"{source}: asked for {limit} records from offset {offset}, "
            f"but it holds only {len(requests)} {good}records from there "
            f"({len(records)} in all): lower num_edits or offset, or give more data")
    return requests


def _read_records(source: str | Path) -> list[dict]:
    source = str(source)
    if source.startswith("hub:"):
        return _hub_records(source)
    path = Path(source)
    text = read_user_text(path, "edit data", "give --data (or data:) a CounterFact JSON or "
                                             "JSON-lines file, or hub:NAME[:SPLIT]")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise EditRecordError(f"{path}: neither a JSON list nor JSON lines ({err}): save "
                                  f"the records as a JSON list of objects, or one JSON object "
                                  f"per line") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise EditRecordError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _hub_records(source: str) -> list[dict]:
    """The records of `hub:NAME[:SPLIT]`; a UserError when the hub cannot give them."""
    from datasets import load_dataset

    name, _, split = source[4:].partition(":")
    try:
        return [dict(row) for row in load_dataset(name, split=split or "train")]
    except (OSError, ValueError) as err:   # not found, no network, offline, unknown split
        raise UserError(f"cannot load edit data {source} from the Hugging Face hub: "
                        f"{brief(err)}; check the name and split, "
                        f"and that the hub is reachable (HF_HUB_OFFLINE unset)") from None


def parse_record(record: object, index: int = 0,
                 max_chars: int | None = None) -> EditRequest:
    """Turn one EasyEdit- or ROME-format record into an `EditRequest`, or raise; with
    `max_chars`, a prompt or answer longer than that is refused."""
    if not isinstance(record, dict):
        raise EditRecordError(f"record {index}: expected an object, got {type(record).__name__}")
    case_id = record.get("case_id", index)
    where = f"record {index} (case_id={case_id})"
    try:
        if "requested_rewrite" in record:
            fields = _rome_fields(record)
        else:
            fields = _easyedit_fields(record)
    except (KeyError, TypeError) as err:
        raise EditRecordError(f"{where}: missing or malformed field {err}") from None
    for key in ("prompt", "subject", "target_new", "ground_truth", "locality_ground_truth"):
        value = fields[key]
        if not isinstance(value, str) or not value.strip():
            raise EditRecordError(f"{where}: field {key!r} is empty or not a string: {value!r}")
    for key in ("rephrase_prompts", "locality_prompts"):
        bad = [p for p in fields[key] if not isinstance(p, str) or not p.strip()]
        if bad:
            raise EditRecordError(f"{where}: {key} holds an empty or non-string prompt: {bad[0]!r}")
    if fields["subject"] not in fields["prompt"]:
        raise EditRecordError(
            f"{where}: subject {fields['subject']!r} does not occur in prompt {fields['prompt']!r}")
    if fields["target_new"].strip() == fields["ground_truth"].strip():
        raise EditRecordError(f"{where}: target_new equals ground_truth ({fields['target_new']!r})")
    if max_chars is not None:
        _check_lengths(fields, where, max_chars)
    return EditRequest(case_id=case_id, **fields)


def _check_lengths(fields: dict, where: str, max_chars: int) -> None:
    """Refuse a prompt or answer of more than `max_chars` characters, before any model sees
    it (see the module docstring)."""
    texts = [(key, fields[key]) for key in ("prompt", "target_new", "ground_truth",
                                            "locality_ground_truth")]
    texts += [(key, text) for key in ("rephrase_prompts", "locality_prompts")
              for text in fields[key]]
    for key, text in texts:
        if len(text) > max_chars:
            raise EditRecordError(
                f"{where}: {key} is {len(text):,} characters long, over the limit of "
                f"{max_chars:,}: shorten it, or raise the limit with --set max_text_chars=N "
                f"(memory grows with the square of the length)")


def _as_prompts(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _easyedit_fields(record: dict) -> dict:
    return dict(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=record["target_new"],
        ground_truth=record["ground_truth"],
        rephrase_prompts=_as_prompts(record.get("rephrase_prompt")),
        locality_prompts=_as_prompts(record.get("locality_prompt")),
        locality_ground_truth=record.get("locality_ground_truth", record["ground_truth"]),
    )


def _rome_fields(record: dict) -> dict:
    rewrite = record["requested_rewrite"]
    template = rewrite["prompt"]
    if "{}" not in template:
        raise KeyError("requested_rewrite.prompt (no '{}' placeholder for the subject)")
    true = rewrite["target_true"]["str"]
    return dict(
        prompt=template.format(rewrite["subject"]),
        subject=rewrite["subject"],
        target_new=rewrite["target_new"]["str"],
        ground_truth=true,
        rephrase_prompts=_as_prompts(record.get("paraphrase_prompts")),
        locality_prompts=_as_prompts(record.get("neighborhood_prompts")),
        locality_ground_truth=true,
    )
