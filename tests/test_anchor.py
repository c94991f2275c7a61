import torch

from tasks.anchor import AnchorArgs, anchor_stats, cached_anchor_stats, read_corpus
from tests.conftest import CORPUS


def test_shard_stats_sum_to_the_whole(tiny):
    texts = read_corpus(CORPUS, 24)
    whole = anchor_stats(tiny, [1, 2], texts, max_tokens=32, batch_size=8)
    shards = [anchor_stats(tiny, [1, 2], texts[i:i + 10], max_tokens=32, batch_size=4)
              for i in range(0, 24, 10)]
    for layer in (1, 2):
        summed = shards[0][layer] + shards[1][layer] + shards[2][layer]
        assert summed.count == whole[layer].count > 24
        torch.testing.assert_close(summed.cov, whole[layer].cov, rtol=1e-9, atol=1e-6)
        cov = whole[layer].cov
        assert cov.dtype == torch.float64 and cov.shape == (128, 128)
        torch.testing.assert_close(cov, cov.T)


def test_stats_match_keys_read_directly(tiny):
    """Σ k kᵀ over the real tokens equals the covariance of the projection's inputs."""
    texts = ["Oil prices rose on Monday.", "A short text"]
    stats = anchor_stats(tiny, [2], texts, max_tokens=32)[2]
    keys = []
    for text in texts:
        seen = {}
        handle = tiny.mlp_out(2).register_forward_pre_hook(lambda m, i: seen.update(k=i[0]))
        tiny.model(**tiny.tokenizer(text, return_tensors="pt"))
        handle.remove()
        keys.append(seen["k"][0].double())
    keys = torch.cat(keys)
    assert stats.count == keys.shape[0]
    expected = keys.T @ keys  # float32 forwards of a padded batch vs one text: ~1e-5 apart
    torch.testing.assert_close(stats.cov, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_cache_is_reused_and_keyed_on_sample_count(tiny, isolated_stores):
    args = AnchorArgs(corpus=str(CORPUS), n_texts=6, max_tokens=16)
    first = cached_anchor_stats(tiny, [1], args, progress=False)[1]
    files = list((isolated_stores / "cache" / "anchor" / "tiny-llama").glob("L1-*-n6-t16.pt"))
    assert len(files) == 1
    again = cached_anchor_stats(tiny, [1], args, progress=False)[1]
    assert torch.equal(first.cov, again.cov) and first.count == again.count
    more = cached_anchor_stats(tiny, [1], AnchorArgs(corpus=str(CORPUS), n_texts=8,
                                                     max_tokens=16), progress=False)[1]
    assert more.count > first.count


def test_anchor_weight_is_independent_of_the_corpus_size(tiny):
    """μ weighs the mean covariance: doubling the corpus leaves P0 = (λI + μC̄0)⁻¹ nearly
    as it was, where a weight on the raw K0ᵀK0 would double the anchor."""
    from tasks.editors.rls import RLSLayerState

    texts = read_corpus(CORPUS, 400)
    half = anchor_stats(tiny, [1], texts[:200], max_tokens=48)[1]
    whole = anchor_stats(tiny, [1], texts, max_tokens=48)[1]
    assert whole.count > 1.8 * half.count
    W0 = tiny.mlp_out(1).weight.detach().T
    P_half = RLSLayerState.init(W0, half.mean_cov, 1.0, 10.0).P
    P_whole = RLSLayerState.init(W0, whole.mean_cov, 1.0, 10.0).P
    P_raw = RLSLayerState.init(W0, whole.cov * (10.0 / half.count), 1.0, 1.0).P
    change = float((P_whole - P_half).norm() / P_half.norm())
    raw_change = float((P_raw - P_half).norm() / P_half.norm())
    assert change < 0.1, change      # what is left is the sampling noise of C̄0
    assert raw_change > 3 * change, (change, raw_change)


def test_anchor_deviation_measures_the_change_on_anchor_keys():
    """tr(ΔWᵀC̄0ΔW)/tr(W0ᵀC̄0W0): zero unedited and for a change the anchor keys never
    reach, ε² for W = (1+ε)W0, and E‖kΔW‖²/E‖kW0‖² over the keys themselves."""
    from tasks.anchor import AnchorStats

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 8, generator=g, dtype=torch.float64)
    keys[:, -2:] = 0                                   # two directions no anchor key has
    stats = AnchorStats(keys.T @ keys, 200)
    W0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    assert stats.deviation(W0, W0) == 0.0
    unseen = W0.clone()
    unseen[-2:] += torch.randn(2, 5, generator=g, dtype=torch.float64)
    assert abs(stats.deviation(unseen, W0)) < 1e-12
    assert abs(stats.deviation(1.1 * W0, W0) - 0.01) < 1e-9
    W = W0 + 0.3 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    direct = float(((keys @ (W - W0)) ** 2).sum() / ((keys @ W0) ** 2).sum())
    assert abs(stats.deviation(W.float(), W0.float()) - direct) < 1e-5 * direct
