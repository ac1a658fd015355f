"""Training: token files, packing, the loss, decay groups, exact resume, Ctrl-C and export."""

import argparse
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rgemma
from rgemma import Config, Griffin
from rgemma.cli import train as train_command
from rgemma.tokenizer import Tokenizer
from rgemma.train import (
    IGNORE, TokenFile, TrainSettings, batch, batch_rows, decayed_parameters, learning_rate, next_token_loss,
    pack_row, parameter_groups, tokenize_corpus, train, write_token_file,
)
from spm import train_tokenizer

BOS, EOS = 2, 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm"), vocab_size=512))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """A repetitive corpus of short documents, and a held-out one."""
    directory = tmp_path_factory.mktemp("corpus")
    sentences = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
                 "What is the capital of France? Paris.", "for i in range(10): total += i * i"]
    paths = {}
    for name, count in (("train", 120), ("eval", 12)):
        lines = [json.dumps({"source": "test", "id": f"{name}{i}", "text": " ".join(sentences[i % 4:] * (1 + i % 3))})
                 for i in range(count)]
        jsonl = directory / f"{name}.jsonl"
        jsonl.write_text("\n".join(lines) + "\n")
        paths[name] = tokenize_corpus(jsonl, tokenizer, directory / f"{name}.tok")
    return paths


def tiny_settings(corpus, run_dir, **changes) -> TrainSettings:
    config = Config.preset("tiny", attention_window=8)
    settings = TrainSettings(
        data=str(corpus["train"]), eval_data=str(corpus["eval"]), run_dir=str(run_dir), model=config,
        steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup=5, eval_every=10, eval_batches=2,
        checkpoint_every=7, log_every=5, progress=False,
    )
    return dataclasses.replace(settings, **changes)


# Token files and packing ------------------------------------------------------


def test_token_file_holds_documents_with_bos_and_eos(corpus, tokenizer):
    data = TokenFile.open(corpus["train"])
    assert data.tokens.dtype == np.uint16 and data.vocab_size == 512
    assert len(data.starts) == 120 and data.starts[0] == 0
    assert (data.tokens[data.starts] == tokenizer.bos_id).all()
    assert (data.tokens[data.starts[1:] - 1] == tokenizer.eos_id).all() and data.tokens[-1] == tokenizer.eos_id
    first = data.tokens[: data.starts[1]]
    assert tokenizer.decode(first[1:-1].tolist()).startswith("The quick brown fox")


def test_not_a_token_file(tmp_path):
    path = tmp_path / "x.tok"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a token file"):
        TokenFile.open(path)


def test_packing_positions_and_masked_targets(tmp_path):
    # Documents: [B 5 6 7 E] [B 8 E] [B 9 10 11 12 13 E]
    documents = [[BOS, 5, 6, 7, EOS], [BOS, 8, EOS], [BOS, 9, 10, 11, 12, 13, EOS]]
    data = TokenFile.open(write_token_file(tmp_path / "t.tok", iter(documents), 512, BOS, EOS))
    assert data.starts.tolist() == [0, 5, 8]
    assert data.num_rows(6) == 2  # 15 tokens: two rows of 6 inputs, each with a next token
    inputs, positions, targets = pack_row(data, 0, 6)
    assert inputs.tolist() == [BOS, 5, 6, 7, EOS, BOS]
    assert positions.tolist() == [0, 1, 2, 3, 4, 0]
    # The eos's target would be the next document's bos: masked.
    assert targets.tolist() == [5, 6, 7, EOS, IGNORE, 8]
    inputs, positions, targets = pack_row(data, 6, 6)
    assert inputs.tolist() == [8, EOS, BOS, 9, 10, 11]
    assert positions.tolist() == [1, 2, 0, 1, 2, 3]  # a document cut by the row keeps its own positions
    assert targets.tolist() == [EOS, IGNORE, 9, 10, 11, 12]
    tokens, positions, targets = batch(data, np.array([1, 0]), 6)
    assert tokens.shape == (2, 6) and tokens.dtype == torch.int64
    assert positions[1].tolist() == [0, 1, 2, 3, 4, 0]


def test_batches_cover_each_epoch_once_in_a_new_order():
    epoch0 = np.concatenate([batch_rows(10, 3, seed=1, batch_index=i) for i in range(3)])
    epoch1 = np.concatenate([batch_rows(10, 3, seed=1, batch_index=i) for i in range(3, 6)])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and not np.array_equal(epoch0, epoch1)
    assert np.array_equal(batch_rows(10, 3, seed=1, batch_index=4), batch_rows(10, 3, seed=1, batch_index=4))


def test_packed_documents_do_not_see_each_other(tiny):
    # Three documents in one row; the window (8) is shorter than the row.
    lengths = (9, 13, 10)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, positions.shape, generator=generator)
    changed = tokens.clone()
    changed[0, 9:22] = torch.randint(3, 512, (13,), generator=generator)  # the middle document
    with torch.no_grad():
        logits, _ = tiny(tokens, positions)
        other, _ = tiny(changed, positions)
    assert not torch.allclose(logits[:, 9:22], other[:, 9:22])
    torch.testing.assert_close(other[:, :9], logits[:, :9], rtol=0, atol=0)
    torch.testing.assert_close(other[:, 22:], logits[:, 22:], rtol=0, atol=1e-6)


# Loss and optimiser -----------------------------------------------------------


def test_chunked_loss_equals_plain_cross_entropy_values_and_gradients(tiny):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (2, 37), generator=generator)
    targets = torch.randint(0, 512, (2, 37), generator=generator)
    targets[0, [3, 20]] = IGNORE

    def grads(loss_fn):
        tiny.zero_grad()
        hidden, _ = tiny(tokens, hidden_only=True)
        loss = loss_fn(hidden)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters()}

    plain_loss, plain = grads(lambda h: F.cross_entropy(tiny.logits(h).flatten(0, 1), targets.flatten(), ignore_index=IGNORE))
    chunked_loss, chunked = grads(lambda h: next_token_loss(tiny, h, targets, chunk=16))
    torch.testing.assert_close(chunked_loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], msg=name)
    with torch.no_grad():
        hidden, _ = tiny(tokens, hidden_only=True)
        torch.testing.assert_close(next_token_loss(tiny, hidden, targets, chunk=16), plain_loss)


@pytest.mark.parametrize("preset", ["tiny", "2b"])
def test_weight_decay_groups(preset):
    # Built on the meta device: the 2b's parameters are names and shapes only.
    model = Griffin(Config.preset(preset), device="meta")
    decayed, plain = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in plain["params"]}
    decay = {names[id(p)] for p in decayed["params"]}
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    assert decay == decayed_parameters(model.config)
    # The rule the groups followed before they were read from the weight table, by name.
    by_name = {name for name in names.values()
               if not name.endswith(("recurrent_param", "bias", "conv_1d.weight"))
               and not name.startswith(("embed_tokens", "final_norm")) and "pre_norm" not in name}
    assert decay == by_name
    assert "layers.0.temporal_block.rg_lru.recurrent_param" in no_decay
    assert "layers.0.temporal_block.rg_lru.input_gate_bias" in no_decay
    assert "layers.0.temporal_block.rg_lru.recurrent_gate_weight" in decay
    assert "layers.2.temporal_block.q_proj.weight" in decay and "layers.1.mlp_block.down_proj.weight" in decay


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 1.0, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[20] == pytest.approx(0.1)


# The loop ---------------------------------------------------------------------


def test_loss_falls_and_the_exported_model_loads(corpus, tmp_path, tokenizer):
    settings = tiny_settings(corpus, tmp_path / "run", tokenizer=str(tokenizer.path))
    losses = []
    result = train(settings, on_step=lambda step, loss: losses.append(loss))
    assert result.step == 30 and not result.interrupted
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "eval_loss" in e] == [10, 20, 30]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])
    assert result.best_eval_loss == min(e["eval_loss"] for e in log if "eval_loss" in e)

    # The final model, read back, gives the trained model's logits.
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    trained = Griffin(settings.model)
    trained.load_state_dict(saved["model"])
    exported = rgemma.load_model(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    assert (tmp_path / "run" / "best" / "config.json").is_file()
    tokens = torch.tensor([tokenizer.encode("The quick brown fox", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens)[0], trained(tokens)[0], rtol=0, atol=0)


def test_interrupted_and_resumed_run_is_bit_identical(corpus, tmp_path):
    steps = 12
    straight = train(tiny_settings(corpus, tmp_path / "a", steps=steps))

    def ctrl_c_at_half(step, loss):
        if step == steps // 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: checkpoint, then return

    settings = tiny_settings(corpus, tmp_path / "b", steps=steps)
    first = train(settings, on_step=ctrl_c_at_half)
    assert first.interrupted and first.step == steps // 2
    assert not (tmp_path / "b" / "final").exists()
    second = train(settings)
    assert second.step == steps and not second.interrupted
    assert second.loss == straight.loss and second.best_eval_loss == straight.best_eval_loss

    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    train(tiny_settings(corpus, tmp_path / "run", steps=2))
    with pytest.raises(ValueError, match="lr"):
        train(tiny_settings(corpus, tmp_path / "run", steps=2, lr=1e-2))


def test_command_line_arguments(corpus, tmp_path):
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args([str(corpus["train"]), "--run-dir", str(tmp_path / "run"), "--width", "32",
                              "--layers", "2", "--heads", "2", "--window", "4", "--steps", "2", "--batch-size", "2",
                              "--seq-len", "16", "--no-progress", "--eval-data", str(corpus["eval"])])
    settings = train_command.train_settings(args)
    assert settings.model.vocab_size == 512 and settings.model.width == 32 and settings.model.mlp_width == 96
    assert settings.model.block_types == ("recurrent", "recurrent") and settings.model.attention_window == 4
    train_command.run(args)
    assert rgemma.load_model(tmp_path / "run" / "final").config == settings.model
