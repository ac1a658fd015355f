"""Evaluation: chunked scoring with the state carried equals one pass; bits per byte; multiple choice."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rgemma
from rgemma.cli import main
from rgemma.hub import DEFAULT_MODEL
from rgemma.tokenizer import Tokenizer
from rgemma.train import eval as evaluation
from rgemma.train.chat_data import render_chat
from rgemma.train.eval import choice_log_likelihoods, evaluate_file, score_choices

# Chunked scoring sums the same per-token losses as one forward, computed in other chunk shapes (float32).
TOLERANCE = 1e-5
STORY = ("Once upon a time a small fox lived at the edge of a great forest. Every morning it ran to the river, "
         "drank, and watched the fish. ")


@pytest.fixture(scope="module")
def model():
    return rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.find(DEFAULT_MODEL)


@torch.no_grad()
def one_pass_nats(model, ids, scored):
    """Summed loss of one forward over the whole document, with plain cross-entropy."""
    logits, _ = model(torch.tensor([ids]))
    targets = torch.tensor([t if s else -100 for t, s in zip(ids[1:], scored[1:])])
    return float(F.cross_entropy(logits[0, :-1], targets, ignore_index=-100, reduction="sum"))


def test_a_long_document_in_chunks_equals_one_pass(model, tokenizer, tmp_path, one_thread):
    text = STORY * 30  # longer than the attention window (256): chunks must carry the state
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": STORY}) + "\n")
    ids = tokenizer.encode(text, bos=True)
    assert len(ids) > 3 * model.config.attention_window
    expected = one_pass_nats(model, ids, [True] * len(ids)) + one_pass_nats(
        model, tokenizer.encode(STORY, bos=True), [True] * 100)
    tokens = len(ids) - 1 + len(tokenizer.encode(STORY, bos=True)) - 1
    for chunk in (7, 100, 10**6):
        score = evaluate_file(model, tokenizer, path, chunk=chunk)
        assert score.tokens == tokens
        assert score.nats == pytest.approx(expected, rel=TOLERANCE), chunk
    result = score.to_dict()
    assert result["loss"] == pytest.approx(expected / tokens, rel=TOLERANCE)
    assert result["perplexity"] == pytest.approx(math.exp(expected / tokens), rel=TOLERANCE)
    assert result["bits_per_byte"] == pytest.approx(expected / math.log(2) / len((text + STORY).encode()),
                                                    rel=TOLERANCE)


def test_a_plain_text_file_is_one_document_read_in_blocks(model, tokenizer, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(evaluation, "TEXT_BLOCK_CHARS", 300)
    text = "".join(f"Line {i}: {STORY}\n" for i in range(8))
    path = tmp_path / "doc.txt"
    path.write_text(text)
    # The blocks end at line breaks; the state runs on from one to the next.
    blocks, at = [], 0
    while at < len(text):
        end = text.index("\n", min(at + 300, len(text) - 1)) + 1
        blocks.append(text[at:end])
        at = end
    assert len(blocks) > 2
    ids = sum((tokenizer.encode(b, bos=i == 0) for i, b in enumerate(blocks)), [])
    score = evaluate_file(model, tokenizer, path, chunk=64)
    assert score.tokens == len(ids) - 1 and score.bytes == len(text.encode())
    assert score.nats == pytest.approx(one_pass_nats(model, ids, [True] * len(ids)), rel=TOLERANCE)


def test_conversations_score_the_replies(model, tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    document = render_chat(tokenizer, messages)
    score = evaluate_file(model, tokenizer, path, chunk=5)
    assert score.tokens == sum(document.trained) and score.bytes == len("Blue.")
    assert score.nats == pytest.approx(one_pass_nats(model, document.ids, document.trained), rel=TOLERANCE)


QUESTIONS = [
    ("Once upon a time a small fox lived at the edge of a great", [" forest.", " xq zzv kkp."], 0),
    ("Every morning it ran to the", [" jjw qqx.", " river,"], 1),
    ("The little fox drank water from the", [" zzq wvx", " vvk pqz", " river"], 2),
]


def test_multiple_choice_picks_the_known_answer(model, tokenizer, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in QUESTIONS))
    result = score_choices(model, tokenizer, path)
    assert result.questions == 3 and result.accuracy == 1.0 and result.accuracy_per_byte == 1.0
    # Each choice's log-likelihood is that of one forward over the context and the choice.
    context, choices, _ = QUESTIONS[0]
    context_ids = tokenizer.encode(context, bos=True)
    for choice, scored in zip(choices, choice_log_likelihoods(model, tokenizer, context, choices)):
        ids = context_ids + tokenizer.encode(choice)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1], dim=-1)
        expected = float(log_probs[torch.arange(len(context_ids) - 1, len(ids) - 1),
                                   torch.tensor(ids[len(context_ids):])].sum())
        assert scored == pytest.approx(expected, rel=TOLERANCE, abs=1e-4)


def test_command_line(tmp_path, capsys):
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps({"text": STORY}) + "\n")
    assert main(["eval", "--data", str(path), "--json", "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"tokens", "loss", "perplexity", "bits_per_byte"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in QUESTIONS))
    assert main(["eval", "--data", str(task), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["b", "c"], "answer": 2}', "task.jsonl:2: answer must be the index of a choice"),
    ('{"context": "a", "choices": ["b"], "answer": 0}', "task.jsonl:2: choices must be a list of at least two"),
    ("{oops", "task.jsonl:2: Expecting property name"),
])
def test_bad_questions_name_their_line(model, tokenizer, tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "answer": 0}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        score_choices(model, tokenizer, path)


def test_bad_documents_name_their_line(model, tokenizer, tmp_path):
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(ValueError, match='doc.jsonl:2: expected an object with "text"'):
        evaluate_file(model, tokenizer, path)


def test_bad_utf8_is_named_with_its_file_and_line(model, tokenizer, tmp_path, capsys):
    path = tmp_path / "doc.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="doc.jsonl:2: 'utf-8' codec can't decode byte 0xe9"):
        evaluate_file(model, tokenizer, path)
    path.write_bytes(b'{"context": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match="doc.jsonl:1: 'utf-8' codec"):
        score_choices(model, tokenizer, path)
    assert main(["eval", "--data", str(path)]) == 1  # the command's own look at the first line too
    assert "doc.jsonl:1: 'utf-8' codec" in capsys.readouterr().err
    text = tmp_path / "doc.txt"
    text.write_bytes(b"plain words and then caf\xe9\n")
    with pytest.raises(ValueError, match="doc.txt: not UTF-8 text"):
        evaluate_file(model, tokenizer, text)


# Measures the whole process's peak memory, from a fresh interpreter: the model, then the document scored.
MILLION_TOKENS = r"""
import json, resource, sys
import psutil, torch
import rgemma
from rgemma.hub import DEFAULT_MODEL
from rgemma.tokenizer import Tokenizer
from rgemma.train.eval import evaluate_file

torch.set_num_threads(2)
model = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32).eval()
tokenizer = Tokenizer.find(DEFAULT_MODEL)
before = psutil.Process().memory_info().rss
score = evaluate_file(model, tokenizer, sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tokens": score.tokens, "loss": score.loss, "before": before, "peak": peak}))
"""


@pytest.mark.slow
def test_a_million_token_document_in_one_pass_in_bounded_memory(tmp_path):
    """A plain text file of over 1M tokens, one document, scored in one pass (chunks of prefill_chunk tokens,
    the state carried): the process grows by little more than one chunk's activations and one block of text's
    tokens. One forward over the whole document would hold tens of GiB of activations (1M x 480 floats is
    1.8 GiB per MLP activation alone). The chunked result equals one pass within TOLERANCE (tested above on
    documents one forward can hold)."""
    path = tmp_path / "long.txt"
    with open(path, "w") as out:
        for i in range(26_000):
            out.write(f"{i}: {STORY}\n")
    result = subprocess.run([sys.executable, "-c", MILLION_TOKENS, str(path)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["tokens"] > 1_000_000
    assert measured["loss"] < math.log(8192)  # finite, and better than a uniform guess over the vocabulary
    # Measured: 1.08M tokens, loss 5.08, 134 MiB above the loaded model (2 threads, 221 s).
    assert measured["peak"] - measured["before"] < 512 * 2**20, measured
