"""Presets, derived values and the Hugging Face config.json translation."""

import pytest
import torch

from rgemma import Config, Griffin
from rgemma.config import PRESETS


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        Config.preset("3b")
    for name in ("2b", "9b", "griffin-7b", "hawk-7b", "tiny"):
        assert name in str(error.value)


@pytest.mark.parametrize("name, parameters", [("2b", 2_682_862_080), ("9b", 8_579_977_216)])
def test_published_parameter_counts(name, parameters):
    model = Griffin(Config.preset(name), device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_2b_details():
    config = Config.preset("2b")
    assert config.embedding_scale == 50.5  # sqrt(2560) rounded to bfloat16
    assert config.block_types[:3] == ("recurrent", "recurrent", "attention")
    assert config.block_types.count("attention") == 8 and config.num_layers == 26
    assert config.head_dim == 256 and config.attention_window == 2048 and config.logits_soft_cap == 30.0
    assert Config.preset("9b").embedding_scale == 64.0
    assert Config.preset("griffin-7b").embedding_scale == 1.0
    assert set(Config.preset("hawk-7b").block_types) == {"recurrent"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_dict_round_trip(name):
    config = Config.preset(name)
    hf = config.to_hf_dict()
    assert hf["intermediate_size"] == 2 * config.mlp_width
    assert Config.from_hf_dict(hf) == config


def test_hf_dict_spellings_of_the_published_configs():
    hf = Config.preset("2b").to_hf_dict()
    # The published 2B config.json spells it `_block_types`, lists only the
    # repeating pattern, and has no embeddings_scale_by_sqrt_dim key.
    hf["_block_types"] = ["recurrent", "recurrent", "attention"]
    del hf["block_types"], hf["embeddings_scale_by_sqrt_dim"]
    assert Config.from_hf_dict(hf) == Config.preset("2b")


def test_bad_configs_name_the_field():
    hf = Config.preset("tiny").to_hf_dict()
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        Config.from_hf_dict(hf)
    with pytest.raises(ValueError, match="block_types"):
        Config.preset("tiny", block_types=("recurrent", "mamba"))
    with pytest.raises(ValueError, match="num_heads"):
        Config.preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="model_type"):
        Config.from_hf_dict({**Config.preset("tiny").to_hf_dict(), "model_type": "gemma"})


def test_recurrence_initialised_on_the_ring():
    model = Griffin(Config.preset("tiny"))
    param = model.layers[0].temporal_block.rg_lru.recurrent_param
    radius = torch.exp(-torch.nn.functional.softplus(param))
    assert radius.min() >= 0.9 - 1e-6 and radius.max() <= 0.999 + 1e-6
