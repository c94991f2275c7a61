"""Anchor statistics as Ray tasks: the corpus is cut into Arrow shards, one task per shard
returns the partial K0ᵀK0 and token count of every edit layer, the driver adds them up.

The sum of the shards equals the single-process `anchor_stats` over the same texts (up to
float64 rounding), so the result goes to the same disk cache as `cached_anchor_stats`
(keyed by model, layer, corpus content, sample count, token cap) and either path reuses
what the other computed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from tasks.anchor import AnchorArgs, AnchorStats, anchor_cache_file, anchor_stats, read_corpus
from tasks.files import write_atomically
from tasks.models import load_model, resolve_spec

log = logging.getLogger(__name__)


def corpus_shards(texts: list[str], n_shards: int) -> list[pa.Table]:
    """`texts` as one Arrow table with a `text` column, cut into `n_shards` contiguous slices."""
    table = pa.table({"text": texts})
    bounds = np.linspace(0, len(texts), n_shards + 1).astype(int)
    return [table.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@ray.remote
def anchor_shard(model: str, layers: list[int], shard: pa.Table, max_tokens: int,
                 batch_size: int, device: str = "cpu") -> dict[int, tuple[np.ndarray, int]]:
    """Partial Σ k kᵀ [d_k, d_k] (float64) and token count per layer over one shard."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()
                                     .get("CPU", 1))))
    lm = load_model(model, device=device)
    stats = anchor_stats(lm, layers, shard.column("text").to_pylist(), max_tokens, batch_size)
    return {layer: (s.cov.numpy(), s.count) for layer, s in stats.items()}


def ray_anchor_stats(model: str, layers: list[int], args: AnchorArgs, n_shards: int,
                     use_gpu: bool = False) -> dict[int, AnchorStats]:
    """Anchor statistics of `layers` over the corpus's first `args.n_texts` texts, from the
    disk cache or computed by `n_shards` Ray tasks and then cached."""
    corpus = Path(args.corpus)
    if not corpus.exists():
        raise FileNotFoundError(f"anchor corpus not found: {corpus}")
    name = resolve_spec(model).name
    files = {layer: anchor_cache_file(name, layer, corpus, args) for layer in layers}
    result = {layer: AnchorStats(**torch.load(f)) for layer, f in files.items() if f.exists()}
    missing = [layer for layer in layers if layer not in result]
    if missing:
        texts = read_corpus(corpus, args.n_texts)
        shards = corpus_shards(texts, n_shards)
        log.info("anchor stats for %s layers %s: %d texts in %d Ray tasks", model, missing,
                 len(texts), len(shards))
        task = anchor_shard.options(num_gpus=1 if use_gpu else 0)
        parts = ray.get([task.remote(model, missing, shard, args.max_tokens, args.batch_size,
                                     "cuda" if use_gpu else "cpu") for shard in shards])
        for layer in missing:   # added in shard order: the same sum on every run
            cov = sum(torch.from_numpy(part[layer][0].copy()) for part in parts)
            stats = AnchorStats(cov, sum(part[layer][1] for part in parts))
            write_atomically(files[layer], lambda tmp, s=stats: torch.save(
                {"cov": s.cov, "count": s.count}, tmp))
            result[layer] = stats
    return {layer: result[layer] for layer in layers}
