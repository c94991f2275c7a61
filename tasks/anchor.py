"""Anchor-key statistics: K0ᵀK0 and the token count of a background corpus, per edit layer.

`anchor_stats` is a plain function over a list of texts, so a Ray task can run it on one
shard and a driver can add the shards up (sums of K0ᵀK0 and of counts are exact).
`cached_anchor_stats` memoises the whole-corpus result on disk, keyed by everything that
changes it: model, layer, corpus content, sample count, token cap.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks.corpus import AGNEWS_TEST, ANCHOR_TEXTS, corpus_texts
from tasks.errors import read_user_text, require_file
from tasks.extract.hooks import StopForward
from tasks.files import write_atomically
from tasks.models import cache_root

log = logging.getLogger(__name__)
CORPUS_FIX = f"set anchor.corpus to a text<TAB>label file (default {AGNEWS_TEST})"


@dataclass
class AnchorArgs:
    corpus: str = AGNEWS_TEST  # text<TAB>label per line
    n_texts: int = ANCHOR_TEXTS  # texts read from the corpus's start (tasks/corpus.py)
    max_tokens: int = 128    # tokens per text at most
    batch_size: int = 16


@dataclass
class AnchorStats:
    """Raw (unnormalised) second moment of the anchor keys of one layer."""

    cov: torch.Tensor   # [d_k, d_k] float64: Σ k kᵀ over all corpus tokens
    count: int          # number of tokens summed

    @property
    def mean_cov(self) -> torch.Tensor:
        """E[k kᵀ] = K0ᵀK0 / n0 [d_k, d_k]: the same whatever the corpus size, so a weight
        on it means the same in a 2,000-text and a 20,000-text anchor corpus."""
        if self.count < 1:
            raise ValueError("anchor statistics over zero tokens: check the anchor corpus")
        return self.cov / self.count

    def __add__(self, other: "AnchorStats") -> "AnchorStats":
        return AnchorStats(self.cov + other.cov, self.count + other.count)

    def deviation(self, W: torch.Tensor, W0: torch.Tensor) -> float:
        """How far the edited layer moved on the anchor keys, relative to what it outputs
        there: tr(ΔWᵀ C̄0 ΔW) / tr(W0ᵀ C̄0 W0) = E‖k ΔW‖² / E‖k W0‖² over anchor tokens,
        with W, W0 [d_k, d_v] and ΔW = W − W0. The quantity RLSEdit's μ-term protects;
        no forward pass."""
        C = self.mean_cov
        W0 = W0.to(C)
        dW = W.to(C) - W0
        return float(((C @ dW) * dW).sum() / ((C @ W0) * W0).sum())


def read_corpus(path: str | Path, n_texts: int | None = None, offset: int = 0) -> list[str]:
    """`n_texts` texts (None: all) from `offset` on of a `text<TAB>label` file, read
    and cleaned by `corpus_texts`; a UserError when the file cannot be read."""
    return corpus_texts(read_user_text(path, "anchor corpus", CORPUS_FIX), n_texts, offset)


@torch.no_grad()
def anchor_stats(lm, layers: list[int], texts: list[str], max_tokens: int = 128,
                 batch_size: int = 16, progress: bool = False) -> dict[int, AnchorStats]:
    """Σ k kᵀ (float64) and token counts of the edited projections' inputs over `texts`."""
    tok = lm.tokenizer
    device = lm.model.device
    totals = {layer: AnchorStats(torch.zeros(lm.mlp_out(layer).in_features,
                                             lm.mlp_out(layer).in_features,
                                             dtype=torch.float64, device=device), 0)
              for layer in layers}
    mask_now: dict[str, torch.Tensor] = {}

    def make_hook(layer):
        def hook(_m, inputs):
            keys = inputs[0][mask_now["mask"]].to(torch.float64)   # [n_tokens, d_k]
            totals[layer].cov.addmm_(keys.T, keys)
            totals[layer].count += keys.shape[0]
        return hook

    last_block = lm.block(max(layers))

    def stop(_m, _i, _o):
        raise StopForward

    handles = [lm.mlp_out(layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    handles.append(last_block.register_forward_hook(stop))
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="anchor stats",
                          disable=not progress):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                      truncation=True, max_length=max_tokens).to(device)
            mask_now["mask"] = enc["attention_mask"].bool()
            try:
                lm.model(**enc, use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {layer: AnchorStats(s.cov.cpu(), s.count) for layer, s in totals.items()}


def anchor_cache_file(model_name: str, layer: int, corpus: Path, args: AnchorArgs) -> Path:
    digest = hashlib.sha1(corpus.read_bytes()).hexdigest()[:12]
    name = f"L{layer}-{corpus.stem}-{digest}-n{args.n_texts}-t{args.max_tokens}.pt"
    return cache_root() / "anchor" / model_name.replace("/", "__") / name


def cached_anchor_stats(lm, layers: list[int], args: AnchorArgs,
                        progress: bool = True) -> dict[int, AnchorStats]:
    """`anchor_stats` over the corpus's first `n_texts` texts, read from / written to disk."""
    corpus = Path(args.corpus)
    require_file(corpus, "anchor corpus", CORPUS_FIX)
    files = {layer: anchor_cache_file(lm.spec.name, layer, corpus, args) for layer in layers}
    result = {layer: AnchorStats(**torch.load(f)) for layer, f in files.items() if f.exists()}
    missing = [layer for layer in layers if layer not in result]
    if missing:
        texts = read_corpus(corpus, args.n_texts)
        log.info("anchor stats for layers %s over %d texts of %s", missing, len(texts), corpus)
        fresh = anchor_stats(lm, missing, texts, args.max_tokens, args.batch_size, progress)
        for layer, stats in fresh.items():
            write_atomically(files[layer], lambda tmp, stats=stats: torch.save(
                {"cov": stats.cov, "count": stats.count}, tmp))
        result.update(fresh)
    return {layer: result[layer] for layer in layers}
