"""The engines the benchmark compares, each through its implementation's normal incremental API.

An engine is four functions: load (weights -> model), prefill (prompt ->
next-token logits and a cache), step (one greedy token per row -> logits
and the cache) and the bytes its cache holds. The context-growth engines can
also make a cache as after any number of tokens, filled with random values.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch

from rgemma.state import AttentionState, RecurrentState

ENGINE_NAMES = ("rgemma", "transformers", "official")
# rgemma on the same weights quantized at load (`rgemma.quantize`), by bits:
# measured on request, against rgemma's float weights.
QUANTIZED_ENGINES = {"rgemma-int8": 8, "rgemma-int4": 4}
CONTEXT_ENGINES = ("rgemma", "gemma")
# The transformer RecurrentGemma-2B is measured against (Gemma-2B's published config).
GEMMA_2B = dict(vocab_size=256_000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256)


# Random weights ---------------------------------------------------------------------


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with normal noise, 1/sqrt(fan-in) for matrices, 0.1 for vectors.

    Drawing a fresh value for each of billions of weights is slow, so each
    piece of 2^20 values is a slice of one block of noise, at a random offset
    and with a random factor: no two rows repeat, so no two logits tie exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(2**22, generator=generator)
    piece_size = 2**20
    for param in module.parameters():
        scale = param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1
        flat = param.view(-1)
        for start in range(0, flat.numel(), piece_size):
            piece = flat[start : start + piece_size]
            offset = int(torch.randint(0, block.numel() - piece.numel() + 1, (), generator=generator))
            factor = scale * (0.5 + float(torch.rand((), generator=generator)))
            piece.copy_(block[offset : offset + piece.numel()] * factor)
    return module


@torch.no_grad()
def random_model(config, dtype: torch.dtype, seed: int):
    from rgemma.model import Griffin

    model = randomise_(Griffin(config, dtype=dtype, device="meta").to_empty(device="cpu"), seed)
    # A smaller embedding, so that the layers and not the input token decide
    # the next token: the engines' greedy tokens then agree only if every weight does.
    model.embed_tokens.weight.mul_(config.width**-0.5)
    return model.eval()


# Sizes ------------------------------------------------------------------------------


def tensor_bytes(value) -> int:
    """Bytes of the tensors in nested dicts, lists, tuples and dataclasses."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def weight_bytes(model) -> int:
    """Bytes of the parameters, and of rgemma's quantized weights, which are buffers."""
    from rgemma.quantize import quantized_modules

    quantized = sum(getattr(m, part).nbytes for m in quantized_modules(model).values() for part in m.FORMAT)
    return sum(p.numel() * p.element_size() for p in model.parameters()) + quantized


# rgemma -----------------------------------------------------------------------------


def _load_rgemma(path, dtype, device, quantize: int | None = None):
    from rgemma.checkpoint import load_model

    model = load_model(path, dtype=dtype, device=device, quantize=quantize).eval()
    _backend(model)  # prepared for its device before anything runs
    return model


@functools.cache
def _backend(model):
    from rgemma.backends import prepare

    return prepare(model)


def _prefill_rgemma(model, tokens):
    return model.prefill(tokens)


def _step_rgemma(model, tokens, state, position):
    return _backend(model).step(tokens, state)


def _random_rgemma_state(model, batch: int, length: int):
    """A state as after `length` tokens, with random contents: its shape never depends on the length."""
    state = model.init_state(batch)
    window = model.config.attention_window
    positions = torch.arange(max(0, length - window), length, device=model.device)
    for layer in state.layers:
        if isinstance(layer, RecurrentState):
            layer.h.normal_()
            layer.conv.normal_()
        elif isinstance(layer, AttentionState):
            layer.k.normal_()
            layer.v.normal_()
            layer.pos[:, positions % window] = positions
    state.position.fill_(length)
    return state


# transformers: RecurrentGemma, and Gemma for --context-growth -------------------------


def _load_transformers(path, dtype, device):
    from transformers import RecurrentGemmaForCausalLM

    return RecurrentGemmaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@functools.cache
def _cache_argument(model_type: type) -> str:
    # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _hf_forward(model, tokens, positions, cache, **extra):
    out = model(tokens, position_ids=positions, use_cache=True, **{_cache_argument(type(model)): cache}, **extra)
    return out.logits[:, -1].float()


def _prefill_hf(model, tokens, chunk: int | None = None):
    """Read the prompt (in chunks where the model can append several tokens to a cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    chunk = chunk or tokens.shape[1]
    for start in range(0, tokens.shape[1], chunk):
        part = slice(start, start + chunk)
        logits = _hf_forward(model, tokens[:, part], positions[:, part], cache, logits_to_keep=1)
    return logits, cache


def _step_hf(model, tokens, cache, position):
    positions = torch.full_like(tokens, position)
    return _hf_forward(model, tokens, positions, cache), cache


def _hf_cache_bytes(model, cache) -> int:
    # transformers' RecurrentGemma keeps the recurrent states on its modules, not in the cache.
    module_states = [(m.conv1d_state, m.rg_lru.recurrent_states) for m in model.modules() if hasattr(m, "conv1d_state")]
    layers = [[getattr(layer, "keys", None), getattr(layer, "values", None)] for layer in cache.layers]
    return tensor_bytes(layers) + tensor_bytes(module_states)


def gemma_config(config) -> dict:
    """The transformer of the context-growth comparison: Gemma-2B for the 2b shape, else one of the same shape."""
    from rgemma.config import PRESETS

    shape = ("vocab_size", "width", "mlp_width", "num_heads", "block_types")
    if all(getattr(config, f) == getattr(PRESETS["2b"], f) for f in shape):
        return dict(GEMMA_2B)
    return dict(vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=1, head_dim=config.head_dim)


def _load_gemma(gemma: dict, dtype, device):
    from transformers import GemmaConfig, GemmaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # randomise_ fills the weights much faster than the init functions
        model = GemmaForCausalLM._from_config(GemmaConfig(**gemma), dtype=dtype)
    model.tie_weights()
    return randomise_(model, seed=1).to(device).eval()


def _random_hf_cache(model, batch: int, length: int):
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=model.dtype, device=model.device),
                     torch.randn(shape, dtype=model.dtype, device=model.device), layer)
    return cache


# The official implementation --------------------------------------------------------


def official_config(config):
    """rgemma Config -> the official GriffinConfig."""
    from recurrentgemma import common

    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(
        vocab_size=config.vocab_size, width=config.width, mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads, lru_width=config.lru_width,
        block_types=tuple(kinds[b] for b in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window, logits_soft_cap=config.logits_soft_cap,
    )


@torch.no_grad()
def _load_official(path, dtype, device):
    """The official model with the weights rgemma reads, written through rgemma's official naming table.

    The table's fix-ups turn an official tensor into a view in rgemma's layout,
    so copying into that view writes the official tensor.
    """
    from recurrentgemma.torch import griffin

    from rgemma.checkpoint import official_name

    ours = _load_rgemma(path, dtype, "cpu")
    model = griffin.Griffin(official_config(ours.config), gradient_checkpointing=False, device="meta", dtype=dtype)
    model = model.to_empty(device=device)
    theirs = model.state_dict()
    written = set()
    for name, tensor in ours.state_dict().items():
        their_name, fix = official_name(name)
        fix(theirs[their_name]).copy_(tensor)
        written.add(their_name)
    if written != theirs.keys():
        raise ValueError(f"official tensors not written: {sorted(theirs.keys() - written)}")
    return model.eval()


def _positions(tokens, start: int = 0):
    return (start + torch.arange(tokens.shape[1], device=tokens.device)).expand_as(tokens)


def _prefill_official(model, tokens):
    # As the official sampler does: all but the last token without logits, then the last.
    cache = None
    if tokens.shape[1] > 1:
        _, cache = model(tokens[:, :-1], _positions(tokens[:, :-1]), return_logits=False, return_cache=True)
    logits, cache = model(tokens[:, -1:], _positions(tokens[:, -1:], tokens.shape[1] - 1), cache)
    return logits[:, -1].float(), cache


def _step_official(model, tokens, cache, position):
    logits, cache = model(tokens, _positions(tokens, position), cache)
    return logits[:, -1].float(), cache


# The registry -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Engine:
    package: str  # the module that must be installed
    load: Callable  # (weights directory, or the Gemma config dict; dtype, device) -> model
    prefill: Callable  # (model, tokens (B, T)) -> next-token logits (B, V) float32, cache
    step: Callable  # (model, tokens (B, 1), cache, position) -> logits (B, V) float32, cache
    cache_bytes: Callable  # (model, cache) -> bytes held for the sequences
    random_cache: Callable | None = None  # (model, batch, length) -> a cache as after `length` tokens


# In the order they run: the official code, the slowest on CPUs without bf16 arithmetic, last.
ENGINES = {
    "rgemma": Engine("rgemma", _load_rgemma, _prefill_rgemma, _step_rgemma,
                     lambda model, state: state.nbytes, _random_rgemma_state),
    **{name: Engine("rgemma", functools.partial(_load_rgemma, quantize=bits), _prefill_rgemma, _step_rgemma,
                    lambda model, state: state.nbytes)
       for name, bits in QUANTIZED_ENGINES.items()},
    "transformers": Engine("transformers", _load_transformers, _prefill_hf, _step_hf, _hf_cache_bytes),
    # Only in --context-growth: the transformer baseline, random weights.
    "gemma": Engine("transformers", _load_gemma, lambda model, tokens: _prefill_hf(model, tokens, chunk=2048),
                    _step_hf, _hf_cache_bytes, _random_hf_cache),
    "official": Engine("recurrentgemma", _load_official, _prefill_official, _step_official,
                       lambda model, cache: tensor_bytes(cache)),
}


def installed(engine: str) -> bool:
    return importlib.util.find_spec(ENGINES[engine].package) is not None
