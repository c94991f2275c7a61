"""Retention windows of a stream's evaluation: the first `retention_edits` as
`retention_<metric>`, and each of `retention_also` as `retention<k>_<metric>`, scored on
the model as it is at that point; and the last `recent_edits` applied as
`recent_<metric>`."""

from dataclasses import replace

from tasks.evaluate.metrics import aggregate, score_requests
from tasks.stream import (StreamConfig, config_digest, scored_evaluation, stream_requests,
                          unedited_scores)
from tests.conftest import EDIT_DATA


def test_extra_retention_window_is_the_mean_over_its_first_edits(tiny):
    cfg = StreamConfig(model="tiny-llama", data=str(EDIT_DATA), num_edits=12, eval_max=3,
                       retention_edits=2, retention_also=[5])
    requests, _ = stream_requests(cfg, tiny.tokenizer)
    metrics, _ = scored_evaluation(tiny, requests, cfg, n_done=8, final=False)

    direct = score_requests(tiny, requests[:5], cfg.eval_batch_size)
    expected = aggregate(direct, "retention5_")
    for name in ("efficacy", "generalization", "specificity"):
        assert metrics[f"retention5_{name}"] == expected[f"retention5_{name}"]
        assert metrics[f"retention5_{name}_se"] == expected[f"retention5_{name}_se"]
    assert metrics["retention_efficacy"] == aggregate(direct[:2])["efficacy"]


def test_a_window_longer_than_the_stream_so_far_stops_at_its_last_edit(tiny):
    cfg = StreamConfig(model="tiny-llama", data=str(EDIT_DATA), num_edits=12,
                       retention_edits=2, retention_also=[1000])
    requests, _ = stream_requests(cfg, tiny.tokenizer)
    metrics, _ = scored_evaluation(tiny, requests, cfg, n_done=4, final=False)
    direct = score_requests(tiny, requests[:4], cfg.eval_batch_size)
    assert metrics["retention1000_efficacy"] == aggregate(direct)["efficacy"]


def test_the_recent_window_is_the_mean_over_the_last_edits_applied(tiny):
    cfg = StreamConfig(model="tiny-llama", data=str(EDIT_DATA), num_edits=12, eval_max=3,
                       retention_edits=2, recent_edits=3)
    requests, _ = stream_requests(cfg, tiny.tokenizer)
    metrics, _ = scored_evaluation(tiny, requests, cfg, n_done=8, final=False)
    expected = aggregate(score_requests(tiny, requests[5:8], cfg.eval_batch_size), "recent_")
    for name in ("efficacy", "generalization", "specificity"):
        assert metrics[f"recent_{name}"] == expected[f"recent_{name}"]
    early, _ = scored_evaluation(tiny, requests, cfg, n_done=2, final=False)
    assert early["recent_efficacy"] == early["retention_efficacy"]   # both: edits 0 and 1


def test_extra_windows_are_logging_only_and_leave_a_checkpoint_resumable():
    plain = StreamConfig(num_edits=12)
    assert config_digest(plain) == config_digest(StreamConfig(num_edits=12,
                                                              retention_also=[100]))
    assert config_digest(plain) == config_digest(StreamConfig(num_edits=12, recent_edits=100))


def test_the_unedited_scores_have_no_recent_window_and_share_one_cache(tiny):
    cfg = StreamConfig(model="tiny-llama", data=str(EDIT_DATA), num_edits=12, retention_edits=2,
                       fluency_samples=0, offset=40)
    requests, _ = stream_requests(cfg, tiny.tokenizer)
    plain = unedited_scores(tiny, requests, cfg)
    assert not any(name.startswith("recent_") for name in plain)
    with_recent = replace(cfg, recent_edits=3)
    assert unedited_scores(None, requests, with_recent) == plain   # read from the cache
