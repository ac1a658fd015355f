"""Fine-tuning: chat data and its loss mask, packing, and `finetune` (full and LoRA, resume, bad input)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rgemma
from rgemma.cli import main
from rgemma.hub import DEFAULT_MODEL
from rgemma.lora import LoraSettings, adapter_parameters, add_lora, load_adapter
from rgemma.model import Linear
from rgemma.tokenizer import Tokenizer, chat_prompt
from rgemma.train import IGNORE, next_token_loss
from rgemma.train.chat_data import Document, load_rows, pack, read_documents, render_chat, render_text
from rgemma.train.finetune import CHECKPOINT_DIR, FINAL_DIR, META_FILE, finetune
from rgemma.train.finetune_settings import FinetuneSettings
from rgemma.train.frozen import FrozenLinear, base_matrices
from conftest import perturb_

# A task the embedded model cannot know: a made-up word for each colour.
SECRETS = {"red": "Apple.", "blue": "Ocean.", "green": "Forest.", "black": "Night."}


def conversation(colour):
    return [{"role": "user", "content": f"What is the secret word for {colour}?"},
            {"role": "assistant", "content": SECRETS[colour]}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.find(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(c)}) + "\n" for c in SECRETS))
    return path


def settings(data, out, **changes) -> FinetuneSettings:
    base = dict(data=str(data), out=str(out), lora_rank=8, steps=6, batch_size=4, seq_len=32, lr=5e-3, warmup=2,
                checkpoint_every=100, log_every=1, progress=False, dtype="float32")
    return FinetuneSettings(**(base | changes))


def log_losses(out):
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


# Rendering and the loss mask ------------------------------------------------------


def test_loss_counts_the_replies_and_their_end_of_turn_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Your name?"},
                {"role": "assistant", "content": "Griffin."}]
    document = render_chat(tokenizer, messages)
    assert document.ids == chat_prompt(tokenizer, messages, add_generation_prompt=False)
    trained = [i for i, t in zip(document.ids, document.trained) if t]
    reply = tokenizer.encode("Hello!") + [tokenizer.end_of_turn_id]
    assert trained == reply + tokenizer.encode("Griffin.") + [tokenizer.end_of_turn_id]
    # Each reply follows its prompt exactly as generation would see it.
    prompt = chat_prompt(tokenizer, messages[:2])
    assert document.ids[: len(prompt) + len(reply)] == prompt + reply
    text = render_text(tokenizer, "plain words")
    assert text.ids[0] == tokenizer.bos_id and text.ids[-1] == tokenizer.eos_id and text.trained[1:] == [True] * (
        len(text.ids) - 1) and not text.trained[0]


def test_user_tokens_carry_no_loss(tokenizer):
    """The gradient of the loss reaches no position whose next token is the user's, nor any header."""
    model = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)
    document = render_chat(tokenizer, conversation("red") + [{"role": "user", "content": "And blue?"},
                                                             {"role": "assistant", "content": "Ocean."}])
    rows = pack([document], 48, pad_id=0)
    hidden, _ = model(rows.tokens, rows.positions, hidden_only=True)
    hidden.retain_grad()
    next_token_loss(model, hidden, rows.targets).backward()
    has_gradient = hidden.grad[0].abs().sum(-1) > 0  # (T,): position t predicts token t + 1
    n = len(document.ids)
    assert has_gradient[: n - 1].tolist() == document.trained[1:]
    assert not has_gradient[n - 1 :].any()  # the last token and the padding
    user = chat_prompt(tokenizer, [{"role": "user", "content": "And blue?"}])[1:]  # a user turn's ids
    start = next(i for i in range(n) if document.ids[i : i + len(user)] == user)
    assert not has_gradient[start - 1 : start + len(user) - 1].any()


# Packing ----------------------------------------------------------------------------


def test_packing_keeps_documents_whole_and_apart(tokenizer):
    documents = [render_chat(tokenizer, conversation(c)) for c in SECRETS] + [render_text(tokenizer, "a b c")]
    lengths = [len(d.ids) for d in documents]
    assert lengths == [26, 25, 26, 25, 5]
    rows = pack(documents, 56, pad_id=0)
    assert len(rows) == 2  # first fit: two conversations per row, the text in the first row's gap
    assert rows.tokens[0, 51:].tolist() == documents[4].ids
    starts = (rows.positions == 0).nonzero().tolist()
    # Every document starts at position 0 and runs whole within its row; the tail is a padding document.
    for r in range(len(rows)):
        found = [c for row, c in starts if row == r] + [56]
        for begin, end in zip(found, found[1:]):
            assert rows.positions[r, begin:end].tolist() == list(range(end - begin))
    assert _document_lengths(rows) == [26, 25, 5, 26, 25, 5]  # the last: row 1's padding document
    assert (rows.tokens[1, 51:] == 0).all() and (rows.targets[1, 50:] == IGNORE).all()
    # The model reads a packed document as it reads it alone.
    model = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32).eval()
    second = documents[1].ids
    with torch.no_grad():
        alone, _ = model(torch.tensor([second]))
        packed, _ = model(rows.tokens[:1], rows.positions[:1])
    torch.testing.assert_close(packed[0, lengths[0] : lengths[0] + len(second)], alone[0], rtol=1e-4, atol=1e-4)


def _document_lengths(rows):
    lengths = []
    for r in range(len(rows)):
        starts = (rows.positions[r] == 0).nonzero()[:, 0].tolist() + [rows.positions.shape[1]]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return lengths


@pytest.mark.parametrize("line, message", [
    ("{not json", "train.jsonl:2: Expecting property name"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "train.jsonl:2: message 0: unknown role 'robot'"),
    ('{"messages": []}', "train.jsonl:2: empty conversation"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "train.jsonl:2: the conversation has no assistant reply"),
    ('{"prompt": "x"}', 'train.jsonl:2: expected an object with "messages"'),
    ('[1, 2]', 'train.jsonl:2: expected an object'),
])
def test_bad_lines_name_their_number(tmp_path, tokenizer, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("?", r"\?")):
        read_documents(path, tokenizer)


def test_bad_utf8_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n{\"text\": \"caf\xe9\"}\n")
    with pytest.raises(ValueError, match="train.jsonl:2: 'utf-8' codec can't decode byte 0xe9"):
        read_documents(path, tokenizer)


def test_a_conversation_longer_than_a_row_is_an_error(data, tokenizer):
    with pytest.raises(ValueError, match="train.jsonl:1: 2[0-9] tokens, more than a row of 8"):
        load_rows(data, tokenizer, 8)
    with pytest.raises(ValueError, match="more than a row"):
        pack([Document([1] * 9, [True] * 9)], 8, pad_id=0)


# Fine-tuning -----------------------------------------------------------------------


def test_lora_learns_a_chat_task_and_leaves_the_base_alone(data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    result = finetune(settings(data, out, steps=60, warmup=5, log_every=10))
    losses = log_losses(out)
    assert result.step == 60 and losses[-1] < 0.1 * losses[0], losses
    assert sorted(p.name for p in (out / FINAL_DIR).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = rgemma.load_model(DEFAULT_MODEL)  # bf16
    matrices = base_matrices(base)
    trained = dict(result.model.named_parameters())
    for name, param in base.named_parameters():  # frozen, and still the base's values
        key = name if name in trained else name.replace("input_gate_weight", "parametrizations.input_gate_weight.original") \
            .replace("recurrent_gate_weight", "parametrizations.recurrent_gate_weight.original")
        key = key if key in trained else key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        # The matrices held in the checkpoint's 16 bits, the rest in float32.
        assert trained[key].dtype == (torch.bfloat16 if name in matrices else torch.float32), name
        assert torch.equal(trained[key], param.to(trained[key].dtype)) and not trained[key].requires_grad, name
    # The model now answers the training prompts.
    for colour, answer in SECRETS.items():
        assert main(["generate", "--chat", "--adapter", str(out / FINAL_DIR), "--temperature", "0",
                     "--max-tokens", "6", "--json", f"What is the secret word for {colour}?"]) == 0
        assert json.loads(capsys.readouterr().out)["text"].strip() == answer
    # And in `rgemma chat` (serve: tests/test_server.py).
    chat = subprocess.run([sys.executable, "-m", "rgemma.cli", "chat", "--adapter", str(out / FINAL_DIR),
                           "--temperature", "0", "--max-tokens", "6"], input="What is the secret word for blue?\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip() == SECRETS["blue"], chat.stderr


def test_full_finetuning_writes_a_model_that_loads(data, tmp_path, one_thread):
    out = tmp_path / "run"
    result = finetune(settings(data, out, lora_rank=0, steps=4, lr=1e-4))
    assert not result.interrupted
    exported = rgemma.load_model(out / FINAL_DIR)
    assert exported.dtype == torch.float32 and (out / FINAL_DIR / "tokenizer.model").is_file()
    seq = torch.tensor([[2, 100, 200, 300]])
    with torch.no_grad():
        torch.testing.assert_close(exported(seq)[0], result.model.eval()(seq)[0], rtol=0, atol=0)
        assert not torch.allclose(exported(seq)[0], rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)(seq)[0])
    # From a float32 file (whose tensors may load as views of its memory map): the file is left as it was.
    weights = out / FINAL_DIR / "model.safetensors"
    before = weights.read_bytes()
    again = finetune(settings(data, tmp_path / "again", model=str(out / FINAL_DIR), lora_rank=0, steps=2, lr=1e-4))
    assert weights.read_bytes() == before
    with torch.no_grad():
        assert not torch.allclose(again.model.eval()(seq)[0], exported(seq)[0])


def test_decay_groups_as_in_pre_training():
    """Full fine-tuning decays the linear maps' matrices only (not the recurrence, norms, biases or the
    embedding), as `rgemma train` does; LoRA decays its factors, the only parameters it trains."""
    from rgemma.train import decayed_parameters
    from rgemma.train.finetune import _optimizer

    model = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = _optimizer(model, settings("x", "y", lora_rank=0, weight_decay=0.1)).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == decayed_parameters(model.config) and decayed | plain == set(names.values())
    assert "layers.0.temporal_block.rg_lru.recurrent_param" in plain and "embed_tokens.weight" in plain
    add_lora(model, LoraSettings(rank=2))
    (group,) = _optimizer(model, settings("x", "y", weight_decay=0.1)).param_groups
    assert group["weight_decay"] == 0.1 and {id(p) for p in group["params"]} == {
        id(p) for p in adapter_parameters(model)}


def test_bfloat16_autocast(data, tmp_path, one_thread):
    """--dtype bfloat16 computes under autocast (the loss moves by bf16 rounding only); auto chooses it
    where the CPU computes bf16 natively."""
    from rgemma.backends.base import Options
    from rgemma.train.finetune import autocast_dtype

    first = {dtype: log_losses(finetune(settings(data, tmp_path / dtype, steps=1, dtype=dtype)).out)[0]
             for dtype in ("float32", "bfloat16")}
    assert first["bfloat16"] != first["float32"] and first["bfloat16"] == pytest.approx(first["float32"], rel=2e-2)
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None and autocast_dtype("bfloat16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if Options().resolved().native_bf16 else None)


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """One small random Griffin saved in float32 and in float16, with the embedded tokenizer."""
    directory = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    model = perturb_(rgemma.Griffin(rgemma.Config.preset("tiny-wide-lru").replace(vocab_size=8192)))
    paths = {}
    for dtype in (torch.float32, torch.float16):
        paths[dtype] = rgemma.save_model(model.to(dtype), directory / str(dtype).removeprefix("torch."))
        shutil.copyfile(Path(DEFAULT_MODEL) / "tokenizer.model", paths[dtype] / "tokenizer.model")
    return paths


@pytest.mark.parametrize("checkpoint, base, expected", [
    ("embedded", "auto", torch.bfloat16), (torch.float16, "auto", torch.float16),
    (torch.float32, "auto", torch.bfloat16), (torch.float32, "float32", torch.float32),
    (torch.float16, "bfloat16", torch.bfloat16)])
def test_lora_holds_the_base_matrices_in_16_bits_and_the_rest_in_float32(small_checkpoints, checkpoint, base,
                                                                         expected):
    from rgemma.train.distributed import World
    from rgemma.train.finetune import _load

    model_path = str(DEFAULT_MODEL) if checkpoint == "embedded" else str(small_checkpoints[checkpoint])
    world = World(0, 1, torch.device("cpu"))
    model, _ = _load(settings("x", "y", model=model_path, lora_base_dtype=base), world)
    matrices, factors = base_matrices(model), {id(p) for p in adapter_parameters(model)}
    for name, param in model.named_parameters():
        if id(param) in factors:
            assert param.dtype == torch.float32 and param.requires_grad, name
            continue
        plain = name.replace(".base.", ".").replace("parametrizations.", "").replace(".original", "")
        assert param.dtype == (expected if plain in matrices else torch.float32) and not param.requires_grad, name
    # Every frozen linear, adapted or not, keeps no copy for backward (tests/test_frozen.py); the factors train.
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert {type(m) for m in linears if not m.weight.requires_grad} == {FrozenLinear}
    assert {type(m) for m in linears if m.weight.requires_grad} == {Linear}
    # Full fine-tuning: float32 master weights, every one trained, as before.
    model, _ = _load(settings("x", "y", model=model_path, lora_rank=0), world)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, FrozenLinear) for m in model.modules())


def test_lora_with_a_16_bit_base_follows_the_float32_base(data, small_checkpoints, tmp_path, one_thread):
    """The base's matrices in 16 bits, against a float32 base, over 6 steps.

    From a bf16 checkpoint (the embedded model) both hold the file's values: the same products of the same
    numbers, so the same losses to the bit, in float32 and under bf16 autocast. A float32 checkpoint's matrices
    are rounded to bf16, each weight by at most 2^-9 of itself; the loss, which sums the effect of many weights,
    moves by less: measured 2e-4 relative in float32, so 2^-9 (2e-3) is the bound.
    """
    def losses(name, **changes):
        return log_losses(finetune(settings(data, tmp_path / name, **changes)).out)

    for dtype in ("float32", "bfloat16"):
        assert losses(f"16-{dtype}", dtype=dtype) == losses(f"32-{dtype}", dtype=dtype, lora_base_dtype="float32")
    small = str(small_checkpoints[torch.float32])
    rounded, exact = losses("small-16", model=small), losses("small-32", model=small, lora_base_dtype="float32")
    assert rounded != exact and rounded == pytest.approx(exact, rel=2**-9)


def log_entries(out, key):
    return [e[key] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in e]


def test_accumulation_and_checkpointing_leave_the_step_unchanged(tmp_path, one_thread):
    """The loss is normalised by the step's target count, so micro-batches of 1 row give the step of one
    batch of 4 even when the rows hold different numbers of targets (a mean per micro-batch would not)."""
    data = tmp_path / "uneven.jsonl"
    replies = ["Yes.", "No, not today, and not tomorrow either.", "Maybe.", "It is a long story: once upon a time."]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i, reply in enumerate(replies)))
    runs = {name: finetune(settings(data, tmp_path / name, steps=3, **changes)).out for name, changes in
            (("whole", {}), ("micro", {"micro_batch_size": 1}), ("recomputed", {"activation_checkpointing": True}))}
    first = {name: (log_entries(out, "loss")[0], log_entries(out, "grad_norm")[0]) for name, out in runs.items()}
    assert first["micro"] == pytest.approx(first["whole"], rel=1e-5)
    # Later steps: Adam divides each gradient by its own size, so float rounding in a sum of another order
    # (accumulation) can grow; recomputing activations does the same sums in the same order.
    assert log_entries(runs["micro"], "loss") == pytest.approx(log_entries(runs["whole"], "loss"), rel=1e-2)
    assert log_entries(runs["recomputed"], "loss") == pytest.approx(log_entries(runs["whole"], "loss"), rel=1e-6)


def test_gradients_are_clipped_to_grad_clip(data, tmp_path, monkeypatch, one_thread):
    """Every step clips the trained parameters' gradient to --grad-clip before the optimiser reads it; the log
    holds the norm before clipping."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        calls.append((float(norm), max_norm, float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    out = finetune(settings(data, tmp_path / "run", steps=3, grad_clip=0.01)).out
    assert [max_norm for _, max_norm, _ in calls] == [0.01] * 3
    for before, _, after in calls:
        assert before > 0.01 and after == pytest.approx(0.01, rel=1e-4)
    assert log_entries(out, "grad_norm") == pytest.approx([before for before, _, _ in calls], rel=1e-6)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_and_resumed_run_has_the_same_curve(data, tmp_path, stop, one_thread):
    """Ctrl-C and SIGTERM (kill, a scheduler) both end the run after the step with a checkpoint; dropout draws
    from the RNG, which the checkpoint saves."""
    changes = dict(lora_dropout=0.1, steps=8, checkpoint_every=3)
    straight = finetune(settings(data, tmp_path / "a", **changes))

    def interrupt(step, loss):
        if step == 5:
            os.kill(os.getpid(), stop)

    first = finetune(settings(data, tmp_path / "b", **changes), on_step=interrupt)
    assert first.interrupted and first.step == 5 and not (tmp_path / "b" / FINAL_DIR).exists()
    second = finetune(settings(data, tmp_path / "b", **changes))
    assert second.step == 8 and log_losses(tmp_path / "b") == log_losses(tmp_path / "a")
    assert second.loss == straight.loss


def test_resume_refuses_other_settings_and_damaged_checkpoints(data, tmp_path, one_thread):
    out = tmp_path / "run"
    finetune(settings(data, out, steps=2))
    with pytest.raises(ValueError, match="lr: 0.005 in the run, 0.01 now"):
        finetune(settings(data, out, steps=2, lr=1e-2))
    shard = next((out / CHECKPOINT_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        finetune(settings(data, out, steps=2))
    (out / CHECKPOINT_DIR / META_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="meta.pt: cannot read the checkpoint"):
        finetune(settings(data, out, steps=2))


def test_a_crash_while_the_checkpoint_is_replaced_loses_nothing(data, tmp_path, one_thread):
    """Between the two renames that replace checkpoint/, the previous one lies aside: the next run puts it
    back, and removes what an unfinished save left."""
    out = tmp_path / "run"
    finetune(settings(data, out, steps=4, checkpoint_every=2))
    losses = log_losses(out)
    (out / CHECKPOINT_DIR).rename(out / f".{CHECKPOINT_DIR}.old-0a1b2c3d")
    (out / f".{CHECKPOINT_DIR}.tmp-123").mkdir()  # a save cut short
    (out / f".{CHECKPOINT_DIR}.tmp-123" / "__0_0.distcp").write_bytes(b"partial")
    trained = []
    result = finetune(settings(data, out, steps=4, checkpoint_every=2), on_step=lambda step, loss: trained.append(step))
    assert result.step == 4 and not trained and log_losses(out) == losses  # resumed at the end
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_DIR, FINAL_DIR, "log.jsonl"]


def test_a_non_finite_loss_stops_the_run_and_saves_nothing(data, tmp_path, one_thread):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="step [0-9]+: the loss is nan") as error:
        finetune(settings(data, out, lora_rank=0, lr=1e12, grad_clip=1e30, steps=10, checkpoint_every=1))
    failed = int(str(error.value).split(":")[0].removeprefix("step "))
    assert failed > 1 and not (out / FINAL_DIR).exists()
    # The checkpoint is the last finite step's: nothing of the failed step was saved.
    assert torch.load(out / CHECKPOINT_DIR / META_FILE, weights_only=True)["step"] == failed - 1


def test_progress_bar_shows_loss_speed_and_time_left(data, tmp_path, capsys, one_thread):
    finetune(settings(data, tmp_path / "run", steps=2, progress=True))
    bar = capsys.readouterr().err.split("\r")[-1]
    assert re.search(r"fine-tuning: 100%.* 2/2 \[\d+:\d+<\d+:\d+, .*loss=\d+\.\d+, tok_s=\d+\]", bar), bar


def test_command_line(data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--lora-rank", "4", "--lora-targets",
                 "input_gate_weight,q_proj", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--lr", "5e-3", "--warmup", "1",  # steps that move the held-out loss more than rounding does
                 "--eval-data", str(data), "--eval-every", "1", "--lora-base-dtype", "float32", "--no-progress"]) == 0
    assert "done at step 2" in capsys.readouterr().err
    assert torch.load(out / CHECKPOINT_DIR / META_FILE, weights_only=True)["settings"]["lora_base_dtype"] == "float32"
    held_out = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in e]
    assert [e["step"] for e in held_out] == [1, 2] and held_out[1]["eval_loss"] < held_out[0]["eval_loss"]
    config = json.loads((out / FINAL_DIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and all(t.endswith("q_proj") for t in config["target_modules"])
    assert config["rgemma_gate_targets"] and load_adapter(rgemma.load_model(DEFAULT_MODEL), out / FINAL_DIR)
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "x"), "--lora-rank", "4",
                 "--lora-targets", "nothing_here", "--no-progress"]) == 1
    assert "'nothing_here' matches nothing" in capsys.readouterr().err
