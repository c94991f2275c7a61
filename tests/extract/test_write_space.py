"""Edits land where the value optimisation asked, also behind Gemma-3's post-MLP norm."""

import torch

from tasks.anchor import anchor_stats, read_corpus
from tasks.edit_step import apply_edit_batch
from tasks.editors.rls import RLSArgs, RLSEditor
from tasks.extract.keys import block_outputs_at, compute_keys
from tasks.extract.prompts import kl_batch, prompt_batch, rewrite_batch
from tasks.extract.values import ValueArgs, compute_target_values
from tasks.extract.write_space import projection_change, projection_outputs_at, stream_change
from tasks.models import load_model
from tests.conftest import CORPUS
from tests.extract.test_keys_values import request

BARE_ONLY = ["{}"]   # one prompt per edit: its key is the key the edit is written at
VALUES = ValueArgs(steps=30, lr=0.5, clamp_norm_factor=4.0)


def target_of(lm, reqs):
    rewrite, groups = rewrite_batch(lm.tokenizer, reqs, BARE_ONLY)
    return compute_target_values(lm, 1, rewrite, groups, kl_batch(lm.tokenizer, reqs), VALUES)


def rewrite_keys(lm, reqs):
    rewrite, groups = rewrite_batch(lm.tokenizer, reqs, BARE_ONLY)
    return compute_keys(lm, 1, rewrite, groups, len(reqs))[0]


def exact_writer(lm):
    """RLS with a negligible pull and no anchor: one key is written exactly."""
    return RLSEditor({1: lm.edit_weight(1)}, anchor_stats(lm, [1], read_corpus(CORPUS, 8)),
                     RLSArgs(lam=1e-6, mu=0.0))


def test_projection_change_inverts_the_post_mlp_norm():
    lm = load_model("tiny-gemma3")
    norm = lm.mlp_post_norm(1)
    gen = torch.Generator().manual_seed(0)
    m, y = torch.randn(5, 64, generator=gen) * 3, torch.randn(5, 64, generator=gen)
    wanted = stream_change(norm, m, y)
    found = projection_change(norm, m, wanted)
    torch.testing.assert_close(stream_change(norm, m, found), wanted, atol=1e-4, rtol=1e-4)
    assert load_model("tiny-llama").mlp_post_norm(1) is None
    assert torch.equal(projection_change(None, m, wanted), wanted)


def test_gemma3_edit_writes_the_optimised_stream_at_its_key():
    """After the write, the residual stream after the edited block at the edit's key is the
    z the optimisation asked for (within 1e-3 of its norm); writing the stream change at
    the projection, as before this fix, misses it by far more."""
    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    lm = load_model("tiny-gemma3")
    target = target_of(lm, reqs)
    wanted = target.stream_target - target.stream_init
    assert float(wanted.norm(dim=1).min()) > 0.1 * float(target.stream_init.norm(dim=1).max())
    bare = prompt_batch(lm.tokenizer, reqs)

    editor = exact_writer(lm)
    W0 = editor.weight(1).clone()
    apply_edit_batch(lm, editor, reqs, BARE_ONLY, (1,), VALUES)
    miss = (block_outputs_at(lm, 1, bare) - target.stream_target).norm(dim=1)
    scale = target.stream_target.norm(dim=1)
    assert (miss < 1e-3 * scale).all(), (miss, scale)
    # the output keeps its length, so the write is no longer than the optimised δ
    m = projection_outputs_at(load_model("tiny-gemma3"), 1, bare)
    written = rewrite_keys(lm, reqs) @ (editor.weight(1) - W0).float()
    torch.testing.assert_close((m + written).norm(dim=1), m.norm(dim=1), rtol=1e-3, atol=1e-3)
    assert (written.norm(dim=1) <= target.delta.norm(dim=1) + 1e-4).all()

    naive = load_model("tiny-gemma3")          # the old write: the stream change as it is
    keys = rewrite_keys(naive, reqs)
    editor = exact_writer(naive)
    editor.update(1, keys, keys.double() @ editor.weight(1) + wanted.double())
    naive.mlp_out(1).weight.data.copy_(editor.weight(1).T.float())
    naive_miss = (block_outputs_at(naive, 1, bare) - target.stream_target).norm(dim=1)
    assert (naive_miss > 100 * miss).all(), (naive_miss, miss)


def test_llama_edit_writes_the_optimised_stream_at_its_key():
    reqs = [request()]
    lm = load_model("tiny-llama")
    target = target_of(lm, reqs)
    apply_edit_batch(lm, exact_writer(lm), reqs, BARE_ONLY, (1,), VALUES)
    got = block_outputs_at(lm, 1, prompt_batch(lm.tokenizer, reqs))
    torch.testing.assert_close(got, target.stream_target, atol=1e-3, rtol=1e-4)


def test_multi_layer_gemma3_edit_reaches_the_target_stream():
    """Spread over layers 1-2 of tiny Gemma-3 (each layer's share mapped through its own
    norm), the edit still moves the last edited block's stream most of the way to z."""
    reqs = [request()]
    lm = load_model("tiny-gemma3")
    rewrite, groups = rewrite_batch(lm.tokenizer, reqs, BARE_ONLY)
    target = compute_target_values(lm, 2, rewrite, groups, kl_batch(lm.tokenizer, reqs), VALUES)
    anchors = anchor_stats(lm, [1, 2], read_corpus(CORPUS, 8))
    editor = RLSEditor({l: lm.edit_weight(l) for l in (1, 2)}, anchors, RLSArgs(1e-6, 0.0))
    apply_edit_batch(lm, editor, reqs, BARE_ONLY, (1, 2), VALUES)
    got = block_outputs_at(lm, 2, prompt_batch(lm.tokenizer, reqs))
    before = (target.stream_target - target.stream_init).norm()
    assert (got - target.stream_target).norm() < 0.2 * before   # 14% here: the norm
    # fixes the length of what a layer adds, so the last layer cannot make up any rest


def test_key_modes_weight_the_bare_prompt_as_documented(tiny):
    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    templates = ["{}", "News of the day. {}", "I think. {}"]
    rewrite, groups = rewrite_batch(tiny.tokenizer, reqs, templates)
    rows, row_edits = compute_keys(tiny, 1, rewrite, groups, 2, "rows")
    assert rows.shape[0] == 6 and row_edits.tolist() == [0, 0, 0, 1, 1, 1]
    mean, _ = compute_keys(tiny, 1, rewrite, groups, 2, "mean")
    half, edits = compute_keys(tiny, 1, rewrite, groups, 2, "bare_half")
    torch.testing.assert_close(mean[1], rows[3:].mean(0))
    torch.testing.assert_close(half[1], rows[3] / 2 + rows[4:].mean(0) / 2)
    assert edits.tolist() == [0, 1]
    m = projection_outputs_at(tiny, 1, prompt_batch(tiny.tokenizer, reqs))
    assert m.shape == (2, 64)
