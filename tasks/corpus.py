"""The AG News corpus: how its rows are split between uses, and how a row's text is read.

`../shared/data/agnews/test.tsv` holds one `text<TAB>label` row per article (7,600 rows,
no header). Its rows are split so that no use sees another's texts:

- rows [0, 2000): anchor texts, the keys whose outputs the editors protect
  (`ANCHOR_TEXTS`: `AnchorArgs.n_texts`, read from the corpus's start);
- rows [2000, 7000): the lm-eval topic task `rlsedit_agnews` (`TOPIC_ROWS`);
- rows [7000, end): held-out text for perplexity (`HELDOUT_START`): lm-eval's
  `rlsedit_agnews_ppl`, which the evaluator runs on its `heldout.*` settings
  (`HeldoutArgs`).

A row's text is cleaned one of two ways, which give different texts on this corpus
(1,509 of its 7,600 rows hold runs of spaces): each keeps the texts, and so the scores,
of the runs measured with it.

- `cleaned_text` (backslashes become spaces, the ends stripped) for the anchor
  statistics and the held-out perplexity, on the rows `corpus_texts` reads;
- `single_spaced_text` (backslashes become spaces, every run of whitespace one space)
  for the lm-eval topic task, on the rows `tsv_rows` reads.

Nothing of rlsedit is imported here: `tasks/evaluate/lmeval/utils.py`, which lm-eval loads by
path, loads this file by path too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

AGNEWS_TEST = "../shared/data/agnews/test.tsv"
ANCHOR_TEXTS = 2000
HELDOUT_START = 7000
TOPIC_ROWS = (ANCHOR_TEXTS, HELDOUT_START)


@dataclass
class HeldoutArgs:
    """Held-out text for perplexity: texts of `corpus` after those the anchors read."""

    corpus: str = AGNEWS_TEST
    offset: int = HELDOUT_START
    n_texts: int = 100
    max_tokens: int = 128


def cleaned_text(raw: str) -> str:
    """`raw` with backslashes (AG News's escapes) as spaces and its ends stripped; inner
    runs of spaces are kept. The anchors' and the evaluator's held-out texts."""
    return raw.replace("\\", " ").strip()


def single_spaced_text(raw: str) -> str:
    """`raw` with backslashes as spaces and every run of whitespace one space, ends
    stripped. The lm-eval tasks' texts."""
    return " ".join(raw.replace("\\", " ").split())


def corpus_texts(content: str, n_texts: int | None = None, offset: int = 0) -> list[str]:
    """The texts of `content`, a `text<TAB>label` file (a header row, if any, is kept as
    text): each line's first column, `cleaned_text`, the empty ones left out; then
    `n_texts` of them (None: all) from `offset` on."""
    texts = [cleaned_text(line.split("\t")[0]) for line in content.splitlines()]
    texts = [t for t in texts if t]
    end = None if n_texts is None else offset + n_texts
    return texts[offset:end]


def tsv_rows(path: Path, header: bool) -> list[list[str]]:
    """The rows of the tab-separated file `path` as lists of fields (no quoting), the
    first left out when it is a `header`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows
