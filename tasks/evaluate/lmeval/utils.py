"""Local data and metrics for rlsedit's lm-eval tasks (the YAMLs next to this file).

Every loader reads `../shared/data` (or `$RLSEDIT_DATA_DIR`, or the `data_dir` metadata
given to lm-eval's TaskManager) and returns {split: datasets.Dataset}, so the tasks run
with no hub. lm-eval imports this file by path: keep it free of rlsedit imports.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets

TASKS_DIR = Path(__file__).resolve().parents[2]   # tasks/evaluate/lmeval/utils.py
PROJECT_ROOT = TASKS_DIR.parent


def _load_corpus_module():
    """tasks/corpus.py, loaded by path (see the module docstring)."""
    spec = importlib.util.spec_from_file_location("rlsedit_corpus",
                                                  TASKS_DIR / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # where @dataclass looks the module up
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus_module()   # the AG News rows' split between uses, and their reading
AGNEWS_LABELS = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}


def data_root(data_dir: str | None = None) -> Path:
    root = Path(data_dir or os.environ.get("RLSEDIT_DATA_DIR")
                or PROJECT_ROOT.parent / "shared" / "data")
    if not root.is_dir():
        raise FileNotFoundError(f"rlsedit data folder {root} not found: set RLSEDIT_DATA_DIR "
                                f"or pass data_dir in the task metadata")
    return root


def load_sst2(data_dir: str | None = None, **_) -> dict:
    """GLUE SST-2 validation sentences: {sentence, label (0 negative, 1 positive)}."""
    rows = corpus.tsv_rows(data_root(data_dir) / "sst2" / "test.tsv", header=True)
    return {"test": datasets.Dataset.from_list(
        [{"sentence": s, "label": int(y)} for s, y in rows])}


def _agnews(data_dir: str | None) -> list[list[str]]:
    return corpus.tsv_rows(data_root(data_dir) / "agnews" / "test.tsv", header=False)


def load_agnews_topic(data_dir: str | None = None, **_) -> dict:
    """AG News articles {text, label 0-3: World, Sports, Business, Sci/Tech}."""
    first, stop = corpus.TOPIC_ROWS
    docs = [{"text": corpus.single_spaced_text(t), "label": AGNEWS_LABELS[y]}
            for t, y in _agnews(data_dir)[first:stop]]
    return {"test": datasets.Dataset.from_list(docs)}


def first_token_split(tokenizer, text: str, max_tokens: int) -> dict:
    """`text` cut at `max_tokens` tokens of `tokenizer` (as it tokenizes a text alone, with
    any BOS it adds), split after its first token: {context: that token's text,
    continuation: the rest's text, n_scored: the rest's token count}. lm-eval then scores
    every token after the first given all before it, as the encodings round-trip."""
    ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
    context, continuation = (tokenizer.decode(part, clean_up_tokenization_spaces=False)
                             for part in (ids[:1], ids[1:]))
    return {"context": context, "continuation": continuation, "n_scored": len(ids) - 1}


def load_heldout_tokens(data_dir: str | None = None, tokenizer: str | None = None,
                        heldout_corpus: str | None = None,
                        heldout_offset: int = corpus.HELDOUT_START,
                        heldout_texts: int | None = None, max_tokens: int = 128, **_) -> dict:
    """Held-out text for token perplexity: `heldout_texts` texts (None: all) from
    `heldout_offset` on of `heldout_corpus` (default: AG News, whose rows from 7,000 on no
    other use reads), read as `corpus.corpus_texts` reads them, each `first_token_split`
    with the model's tokenizer (`tokenizer`: a folder it loads from; the evaluator passes
    it in the task metadata). Texts of one token score nothing and are left out."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        raise ValueError("rlsedit_agnews_ppl needs the model's tokenizer folder as `tokenizer` "
                         "in the task metadata (tasks.evaluate.capability passes it)")
    path = Path(heldout_corpus or data_root(data_dir) / "agnews" / "test.tsv")
    texts = corpus.corpus_texts(path.read_text(encoding="utf-8"), heldout_texts, heldout_offset)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    docs = [first_token_split(tok, text, max_tokens) for text in texts]
    return {"test": datasets.Dataset.from_list([d for d in docs if d["n_scored"] > 0])}


def token_perplexity(doc: dict, results: list) -> dict:
    """(log P of the continuation, its token count): `weighted_perplexity` of these is exp
    of the mean NLL per scored token."""
    (loglikelihood, _greedy), = results
    return {"token_perplexity": (loglikelihood, doc["n_scored"])}


def load_gsm8k(data_dir: str | None = None, **_) -> dict:
    """GSM8K test problems {question, answer}; the answer ends with `#### N`."""
    path = data_root(data_dir) / "gsm8k" / "test.jsonl"
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(docs)}


def load_humaneval(data_dir: str | None = None, **_) -> dict:
    """HumanEval problems {task_id, prompt, canonical_solution, test, entry_point}."""
    path = data_root(data_dir) / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(docs)}


def humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each completion becomes the whole function (prompt + completion)."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def passes(program: str, timeout: float = 10.0) -> bool:
    """Run `program` (solution + its unit tests) in a fresh Python process; True when it
    exits cleanly within `timeout` seconds. Only reached when the user allowed code
    execution (lm-eval refuses `unsafe_code` tasks otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        try:
            done = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, timeout=timeout,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def humaneval_pass_at_1(doc: dict, results: list) -> dict:
    """pass@1 of one problem with greedy decoding: the first program passes its tests."""
    program = results[0][0] if isinstance(results[0], list) else results[0]
    test = f"{program}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
    return {"pass_at_1": float(passes(test))}
