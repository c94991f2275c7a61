"""The lm-eval capability suite: local task YAMLs through lm-eval's task manager, on a model
held in memory, checked against the `lm_eval` command line."""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from tasks.config import ConfigError
from tasks.evaluate.capability import (LMEVAL_DIR, CapabilityArgs, CapabilitySuite,
                                       flatten_results, resolve_suite, unedited_capability)
from tests.conftest import DATA, ROOT

LOCAL_TASKS = sorted(p.stem for p in LMEVAL_DIR.glob("*.yaml"))

# the metric each local task reports, as flattened by tasks.evaluate.capability
HEADLINE = {"rlsedit_sst2": "acc", "rlsedit_agnews": "acc",
            "rlsedit_agnews_ppl": "token_perplexity",
            "rlsedit_gsm8k": "exact_match.flexible-extract",
            "rlsedit_humaneval": "pass_at_1.create_test"}


def test_every_local_task_is_known():
    assert set(LOCAL_TASKS) == set(HEADLINE)


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_local_task_loads_through_the_task_manager_and_scores_the_tiny_model(tiny, task):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LMEVAL_DIR), include_defaults=False)
    assert task in manager.all_tasks
    suite = CapabilitySuite(tiny, CapabilityArgs(tasks=[task], limit=2, batch_size=2,
                                                 allow_code_execution=True))
    scores = suite.score()
    value = scores[f"{task}.{HEADLINE[task]}"]
    if "perplexity" in HEADLINE[task]:
        assert value > 1.0     # a random model is far from certain about real text
    else:
        assert 0.0 <= value <= 1.0
    assert all("," not in name for name in scores), "MLflow refuses commas in metric names"


def test_local_tasks_read_the_shared_files():
    sys.path.insert(0, str(LMEVAL_DIR))
    try:
        import utils
    finally:
        sys.path.pop(0)
    sst2 = utils.load_sst2()["test"]
    assert len(sst2) == 872 and set(sst2["label"]) == {0, 1}
    topic = utils.load_agnews_topic()["test"]
    assert len(topic) == 5000 and set(topic["label"]) == {0, 1, 2, 3}
    assert len(utils.load_gsm8k()["test"]) == 1319
    assert len(utils.load_humaneval()["test"]) == 164
    with pytest.raises(FileNotFoundError, match="RLSEDIT_DATA_DIR"):
        utils.load_sst2(data_dir=str(ROOT / "no-such-folder"))


def test_heldout_texts_are_cut_with_the_models_tokenizer_and_split_after_one_token(tiny):
    """The perplexity task's documents: AG News rows 7,000 on, cleaned as the anchors read
    them, cut at `max_tokens` tokens (the tiny tokenizer: bytes), the first one context."""
    sys.path.insert(0, str(LMEVAL_DIR))
    try:
        import utils
    finally:
        sys.path.pop(0)
    docs = utils.load_heldout_tokens(tokenizer=str(tiny.tokenizer_folder()), max_tokens=40)["test"]
    rows = (DATA / "agnews" / "test.tsv").read_text().splitlines()
    first = utils.corpus.cleaned_text(rows[7000].split("\t")[0])
    assert len(docs) == 600 and docs[0]["context"] == first[0]
    assert docs[0]["context"] + docs[0]["continuation"] == first[:40]
    assert {d["n_scored"] for d in docs} == {39}
    few = utils.load_heldout_tokens(tokenizer=str(tiny.tokenizer_folder()), heldout_offset=10,
                                    heldout_texts=3)["test"]
    assert len(few) == 3 and few[0]["context"] == utils.corpus.cleaned_text(
        rows[10].split("\t")[0])[0]
    with pytest.raises(ValueError, match="tokenizer folder"):
        utils.load_heldout_tokens()


def test_humaneval_pass_at_1_runs_the_unit_tests():
    sys.path.insert(0, str(LMEVAL_DIR))
    try:
        import utils
    finally:
        sys.path.pop(0)
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        doc = json.loads(f.readline())
    right = doc["prompt"] + doc["canonical_solution"]
    wrong = doc["prompt"] + "    return False\n"
    assert utils.humaneval_pass_at_1(doc, [right]) == {"pass_at_1": 1.0}
    assert utils.humaneval_pass_at_1(doc, [wrong]) == {"pass_at_1": 0.0}
    assert utils.passes("while True:\n    pass\n", timeout=1.0) is False


def test_suites_resolve_and_refuse_what_they_do_not_know():
    tasks, limit = resolve_suite(CapabilityArgs(profile="cpu"))
    assert tasks == ["rlsedit_sst2", "rlsedit_agnews"] and limit == 200
    tasks, limit = resolve_suite(CapabilityArgs(profile="full"))
    assert "rlsedit_humaneval" not in tasks and "rlsedit_gsm8k" in tasks and limit is None
    tasks, _ = resolve_suite(CapabilityArgs(profile="full", allow_code_execution=True))
    assert "rlsedit_humaneval" in tasks
    assert resolve_suite(CapabilityArgs(tasks=["mmlu"], limit=5)) == (["mmlu"], 5)
    with pytest.raises(ConfigError, match="unknown capability profile 'gpu'.*cpu"):
        resolve_suite(CapabilityArgs(profile="gpu"))
    with pytest.raises(ConfigError, match=r"rlsedit_sst5.*rlsedit_sst2"):
        resolve_suite(CapabilityArgs(tasks=["rlsedit_sst5"]))


def test_flatten_results_names_metrics_for_mlflow():
    results = {"rlsedit_sst2": {"alias": "rlsedit_sst2", "acc,none": 0.5,
                                "acc_stderr,none": 0.1},
               "rlsedit_gsm8k": {"exact_match,strict-match": 0.25,
                                 "exact_match_stderr,strict-match": "N/A"}}
    assert flatten_results(results) == {"rlsedit_sst2.acc": 0.5,
                                        "rlsedit_gsm8k.exact_match.strict-match": 0.25}


def test_unedited_scores_are_computed_once_per_model_and_suite(tiny):
    from tasks.models import cache_root

    suite = CapabilitySuite(tiny, CapabilityArgs(tasks=["rlsedit_sst2"], limit=2))
    first = unedited_capability(suite, "tiny-llama")
    files = list((cache_root() / "capability").glob("*.json"))
    assert files and first == unedited_capability(suite, "tiny-llama")
    suite.score = None   # a second call must not score again
    assert unedited_capability(suite, "tiny-llama") == first


@pytest.fixture(scope="module")
def smollm2():
    from tasks.models import load_model

    return load_model("smollm2-135m")


def lm_eval_command_line(task: str, metric: str, limit: int, metadata: dict | None = None) -> float:
    """`metric` of `task` as `lm_eval --model hf` prints it for the dequantised packaged
    SmolLM2 folder, on the first `limit` documents."""
    from tasks.models import cache_root

    folder = cache_root() / "models" / "smollm2-135m"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    extra = ["--metadata", json.dumps(metadata)] if metadata else []
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},dtype=float32", "--tasks", task, "--include_path",
         str(LMEVAL_DIR), "--limit", str(limit), "--batch_size", "8", *extra],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = re.search(rf"\|{task}\s*\|.*?\|{metric}\s*\|[^|]*\|\s*([0-9.]+)\|", done.stdout)
    assert row, done.stdout[-2000:]
    return float(row.group(1))


def test_in_memory_sst2_score_matches_the_lm_eval_command_line(smollm2):
    """The packaged SmolLM2 on SST-2, first 40 sentences: our in-memory HFLM run and
    `lm_eval --model hf` on the dequantised folder print the same accuracy."""
    ours = CapabilitySuite(smollm2, CapabilityArgs(tasks=["rlsedit_sst2"], limit=40)).score()
    theirs = lm_eval_command_line("rlsedit_sst2", "acc", 40)
    assert ours["rlsedit_sst2.acc"] == pytest.approx(theirs, abs=5e-5)
    assert 0.5 <= ours["rlsedit_sst2.acc"] <= 1.0   # the instruct model is above chance


def test_evaluator_perplexity_matches_the_lm_eval_command_line(smollm2):
    """The evaluators' held-out perplexity (first 20 texts) is what `lm_eval` prints for
    the same task given the model's tokenizer folder: lm-eval's own HFLM, not ours."""
    from tasks.corpus import HeldoutArgs
    from tasks.evaluate.capability import heldout_perplexity, heldout_suite

    ours = heldout_perplexity(heldout_suite(smollm2, HeldoutArgs(n_texts=20)))
    theirs = lm_eval_command_line("rlsedit_agnews_ppl", "token_perplexity", 20,
                                  {"tokenizer": str(smollm2.tokenizer_folder())})
    assert ours == pytest.approx(theirs, abs=5e-4)   # lm-eval prints 4 decimals
    assert 10 < ours < 1000


def test_the_lmeval_tasks_read_the_corpus_splits_without_importing_rlsedit(tmp_path):
    """tasks/evaluate/lmeval/utils.py takes the AG News splits from tasks/corpus.py, loaded
    by path: lm-eval loads utils.py by path, where rlsedit may not be importable."""
    from tasks.anchor import AnchorArgs
    from tasks.corpus import HELDOUT_START, TOPIC_ROWS, HeldoutArgs

    code = (f"import sys; sys.path.insert(0, {str(LMEVAL_DIR)!r}); import utils; "
            f"print(utils.corpus.TOPIC_ROWS, 'tasks' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["(2000,", "7000)", "False"]
    assert (AnchorArgs().n_texts, HeldoutArgs().offset) == TOPIC_ROWS == (2000, HELDOUT_START)
