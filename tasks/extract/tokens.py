"""Tokenised, right-padded text batches with the positions the editors need.

Each row is a text that may contain a subject (its last token is the *lookup* position,
where keys are read and value deltas are injected) and may end with a target continuation
(teacher-forced: `labels[b, t]` is the token that position `t` must predict, -100 else).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor       # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    lookup: torch.Tensor          # [B] long: subject's last token, -1 when the row has none
    labels: torch.Tensor          # [B, T] long: next-token target or -100
    last: torch.Tensor            # [B] long: last real (non-pad) position

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).to(device) for f in
                            ("input_ids", "attention_mask", "lookup", "labels", "last")))

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """The sub-batch of `rows` [b], trimmed to its own widest row."""
        sub = TokenBatch(*(getattr(self, f)[rows] for f in
                           ("input_ids", "attention_mask", "lookup", "labels", "last")))
        width = int(sub.last.max()) + 1
        sub.input_ids, sub.attention_mask = sub.input_ids[:, :width], sub.attention_mask[:, :width]
        sub.labels = sub.labels[:, :width]
        return sub

    @property
    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) of every teacher-forced target token, each [M]."""
        return torch.nonzero(self.labels != -100, as_tuple=True)


def pad_right(rows: list[list[int]], pad: int,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded with `pad` to `width` (default: the longest row): values and
    mask (1 on a row's own tokens), both [B, width] long."""
    width = max(len(row) for row in rows) if width is None else width
    values = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        values[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return values, mask


def build_batch(tokenizer, texts: list[str], subject_ends: list[int | None] | None = None,
                target_starts: list[int | None] | None = None) -> TokenBatch:
    """Tokenise `texts`; mark the token holding character `subject_ends[i] - 1` as lookup and
    the tokens starting at or after character `target_starts[i]` as targets.

    When a row has a target, its final token is dropped from the input (nothing to predict
    after it), so the row's last position predicts the target's last token.
    """
    n = len(texts)
    subject_ends = subject_ends or [None] * n
    target_starts = target_starts or [None] * n
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    rows_ids, rows_lab, lookups = [], [], []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids = list(ids)
        real = [end > start for start, end in offsets]  # special tokens have empty spans
        labels = [-100] * len(ids)
        if target_starts[i] is not None:
            is_target = [r and start >= target_starts[i] for r, (start, _) in zip(real, offsets)]
            if not any(is_target):
                raise ValueError(f"text {texts[i]!r}: the target after character "
                                 f"{target_starts[i]} tokenises to nothing")
            labels = [ids[t + 1] if is_target[t + 1] else -100 for t in range(len(ids) - 1)]
            ids = ids[:-1]
        lookup = -1
        if subject_ends[i] is not None:
            inside = [t for t in range(len(ids)) if real[t] and offsets[t][0] < subject_ends[i]]
            if not inside:
                raise ValueError(f"text {texts[i]!r}: no token before character {subject_ends[i]}")
            lookup = inside[-1]
        rows_ids.append(ids)
        rows_lab.append(labels)
        lookups.append(lookup)
    input_ids, attention = pad_right(rows_ids, tokenizer.pad_token_id)
    labels = pad_right(rows_lab, -100, width=input_ids.shape[1])[0]
    return TokenBatch(input_ids=input_ids, attention_mask=attention,
                      lookup=torch.tensor(lookups), labels=labels,
                      last=attention.sum(1) - 1)
