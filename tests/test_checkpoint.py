"""Checkpoint formats: real files written by the official packages and transformers, round trips, bad input.

Every parameter is random (norms and biases included), so equal logits mean
every tensor landed in the right place with the right layout.
"""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rgemma
from rgemma import checkpoint
from rgemma.checkpoint import CheckpointError, convert, load_model, save_model
from conftest import perturb_
from reference import official_config, official_model, transformers_model

CONFIG = rgemma.Config.preset("tiny-wide-lru")  # lru wider than the model, window 8
ATOL = 2e-5  # float32; logits span about +-10 here


def tokens(batch=2, length=20, seed=0):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, seq):
    return model(seq)[0]


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official model and the .pt file it wrote of itself."""
    model = official_model(CONFIG, seed=1)
    path = tmp_path_factory.mktemp("official") / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def ours(official):
    return load_model(official[1], attention_window=CONFIG.attention_window)


@pytest.fixture(scope="module")
def hf_dir(ours, tmp_path_factory):
    return save_model(ours, tmp_path_factory.mktemp("hf") / "model")


def edited_copy(hf_dir, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of an HF directory with its tensors and/or config.json changed in place by the given functions."""
    out = tmp_path / "edited"
    shutil.copytree(hf_dir, out)
    if edit_tensors:
        # Copies, not views of the file about to be rewritten.
        tensors = {name: t.clone() for name, t in load_file(out / "model.safetensors").items()}
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        hf = json.loads((out / "config.json").read_text())
        edit_config(hf)
        (out / "config.json").write_text(json.dumps(hf))
    return out


# Reading real files ------------------------------------------------------------


def test_official_torch_file_gives_the_official_logits(official, ours):
    model, _ = official
    assert ours.config == CONFIG  # every shape-derived field, block pattern included
    seq = tokens()
    with torch.no_grad():
        expected, _ = model(seq, torch.arange(seq.shape[1]).repeat(seq.shape[0], 1))
    torch.testing.assert_close(logits(ours, seq), expected, rtol=0, atol=ATOL)


def test_official_defaults_fill_what_shapes_cannot_tell(official):
    model = load_model(official[1])
    assert (model.config.attention_window, model.config.logits_soft_cap) == (2048, 30.0)
    assert model.config.embeddings_scale_by_sqrt_dim


def test_flax_orbax_checkpoint_gives_the_official_jax_logits(tmp_path):
    jax = pytest.importorskip("jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    from recurrentgemma.jax import griffin as jax_griffin

    config = rgemma.Config.preset("tiny")
    model = jax_griffin.Griffin(official_config(config))
    seq = tokens(length=config.attention_window + 4)
    jax_seq = jax.numpy.asarray(seq.numpy().astype(np.int32))
    jax_pos = jax.numpy.asarray(np.tile(np.arange(seq.shape[1], dtype=np.int32), (seq.shape[0], 1)))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax_seq, jax_pos))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jax.numpy.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    # As the official release is saved (recurrentgemma.jax.utils.save_parameters).
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", {"params": params})
    apply = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, return_cache=False)[0])
    expected = torch.from_numpy(np.array(apply(params, jax_seq, jax_pos)))

    loaded = load_model(tmp_path / "ckpt", attention_window=config.attention_window)
    assert loaded.config == config
    torch.testing.assert_close(logits(loaded, seq), expected, rtol=0, atol=1e-4)


def test_transformers_reads_ours_and_we_read_theirs(tmp_path):
    pytest.importorskip("transformers")
    from transformers import RecurrentGemmaForCausalLM

    config = rgemma.Config.preset("tiny")  # transformers' conv state assumes lru_width == width
    seq = tokens(length=config.attention_window - 2)  # transformers' window is one key short
    theirs = transformers_model(config, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_model(tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(seq).logits
    torch.testing.assert_close(logits(loaded, seq), expected, rtol=0, atol=1e-4)

    ours = perturb_(rgemma.Griffin(config), seed=3)
    save_model(ours, tmp_path / "ours")
    reread, info = RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reread.eval()(seq).logits, logits(ours, seq), rtol=0, atol=1e-4)


# Round trips -----------------------------------------------------------------


def test_hf_round_trip_is_exact(ours, hf_dir):
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(hf_dir)
    assert loaded.config == ours.config
    assert_same_tensors(loaded, ours)
    seq = tokens()
    torch.testing.assert_close(logits(loaded, seq), logits(ours, seq), rtol=0, atol=0)


def test_sharded_round_trip(ours, tmp_path):
    out = save_model(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and shards == {p.name for p in out.glob("model-*.safetensors")}
    assert_same_tensors(load_model(out), ours)


def test_block_types_spelling_and_tied_head(hf_dir, tmp_path):
    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    def old_spelling(hf):
        hf["_block_types"] = hf.pop("block_types")[:3]  # as the 2B config: a pattern, repeated

    edited = edited_copy(hf_dir, tmp_path, add_head, old_spelling)
    assert_same_tensors(load_model(edited), load_model(hf_dir))


def test_dtype_on_load(official, hf_dir, tmp_path):
    half = load_model(official[1], dtype=torch.bfloat16)
    full = load_model(hf_dir)
    for name, tensor in half.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full.state_dict()[name].to(torch.bfloat16)), name
    # A bf16 checkpoint stays bf16 by default and widens on request.
    save_model(half, tmp_path / "bf16")
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16
    assert_same_tensors(load_model(tmp_path / "bf16", dtype="float32"), half.float())


def test_convert_writes_hf_and_copies_the_tokenizer(official, ours, tmp_path):
    source = tmp_path / "release"
    source.mkdir()
    shutil.copy(official[1], source / "2b.pt")
    (source / "tokenizer.model").write_bytes(b"sentencepiece")
    out = convert(source / "2b.pt", tmp_path / "converted", attention_window=CONFIG.attention_window)
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece"
    assert_same_tensors(load_model(out), ours)


def test_all_attention_official_model_needs_num_heads(tmp_path):
    config = CONFIG.replace(block_types=("attention",) * 2, lru_width=CONFIG.width)
    path = tmp_path / "attention.pt"
    torch.save(official_model(config).state_dict(), path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_model(path)
    assert load_model(path, num_heads=config.num_heads, attention_window=8).config == config


# Bad input ---------------------------------------------------------------------

EMBEDDING = "model.embed_tokens.weight"
GATE = "model.layers.1.temporal_block.rg_lru.input_gate_weight"


@pytest.mark.parametrize(
    "edit_tensors, edit_config, expected",
    [
        (lambda t: t.pop(GATE), None, f"missing tensor {GATE}"),
        (lambda t: t.update({"model.layers.0.extra": torch.zeros(1)}), None, "unexpected tensor model.layers.0.extra"),
        (lambda t: t.update({GATE: torch.zeros(2, 48, 47)}), None,
         f"shape mismatch for {GATE} (in model.safetensors): file has (2, 48, 47), model needs (2, 48, 48)"),
        (lambda t: t.update({"lm_head.weight": t[EMBEDDING] + 1}), None, "lm_head.weight differs from the embedding"),
        (None, lambda hf: hf.update(hidden_size=128), "hidden_size disagrees with the tensors"),
        (None, lambda hf: hf.update(num_hidden_layers=7), "num_hidden_layers disagrees with the tensors"),
        (None, lambda hf: hf.update(intermediate_size=1000), "intermediate_size disagrees with the tensors"),
        (None, lambda hf: hf.update(num_key_value_heads=4), "num_key_value_heads=4"),
    ],
    ids=["missing", "unexpected", "shape", "untied-head", "hidden-size", "layers", "mlp", "kv-heads"],
)
def test_bad_hf_directory(hf_dir, tmp_path, edit_tensors, edit_config, expected):
    edited = edited_copy(hf_dir, tmp_path, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=re.escape(str(edited))) as error:
        load_model(edited)
    assert expected in str(error.value)


def test_truncated_safetensors(hf_dir, tmp_path):
    cut = edited_copy(hf_dir, tmp_path)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_model(cut)


def test_truncated_official_file(official, tmp_path):
    cut = tmp_path / "model.pt"
    data = official[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{cut}: not a readable PyTorch state dict")):
        load_model(cut)


def test_missing_files(ours, hf_dir, tmp_path):
    no_config = edited_copy(hf_dir, tmp_path)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(no_config)

    sharded = save_model(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    shard = sorted(p.name for p in sharded.glob("model-*.safetensors"))[1]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard}, which is missing"):
        load_model(sharded)

    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nowhere")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: unknown checkpoint format")):
            load_model(path)


def test_orbax_not_installed(tmp_path, monkeypatch):
    (tmp_path / "_METADATA").write_text("{}")
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import now raises ImportError
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: reading Orbax/Flax checkpoints needs")):
        load_model(tmp_path)


def test_bad_official_file(official, tmp_path):
    state = torch.load(official[1], weights_only=True)
    state.pop("blocks.2.attention_block.proj_k.weight")
    state["blocks.0.recurrent_block.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "missing tensor blocks.2.attention_block.proj_k.weight" in message
    assert "unexpected tensor blocks.0.recurrent_block.extra" in message

    with pytest.raises(CheckpointError, match="unknown config fields \\['window'\\]"):
        load_model(official[1], window=8)


def test_failed_save_leaves_nothing(ours, tmp_path, monkeypatch):
    calls = []

    def fail_on_second_shard(tensors, file, metadata):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_second_shard)
    with pytest.raises(CheckpointError, match="out: cannot write the checkpoint: disk full"):
        save_model(ours, tmp_path / "out", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []


def test_save_will_not_overwrite(ours, hf_dir):
    with pytest.raises(CheckpointError, match="not an empty directory"):
        save_model(ours, hf_dir)
    assert load_model(hf_dir).config == ours.config
