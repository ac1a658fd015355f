"""The generation engine: parity with the official sampler, batches, stops, snapshots, chat."""

import io

import pytest
import torch

import rgemma
from rgemma.chat import Chat
from rgemma.context import Context
from rgemma.engine import Engine, Request, StopStrings
from rgemma.generate import Generation, prefill
from rgemma.sampling import SamplingParams
from rgemma.state import StateFileError
from rgemma.tokenizer import Tokenizer
from reference import official_model
from spm import train_tokenizer

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
CONFIG = rgemma.Config.preset("tiny-wide-lru")  # window 8: generations run far past it


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm"), vocab_size=CONFIG.vocab_size))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official model and rgemma's load of the file it wrote."""
    model = official_model(CONFIG, seed=11)
    path = tmp_path_factory.mktemp("official") / "model.pt"
    torch.save(model.state_dict(), path)
    return model, rgemma.load_model(path, attention_window=CONFIG.attention_window).eval()


@pytest.fixture(scope="module")
def model(official):
    return official[1]


def run(model, tokenizer, requests, context=None):
    """All events of a generation, per request: (tokens, text, finish_reason)."""
    generation = Generation(Engine(model, tokenizer), requests, context)
    out = {i: ([], [], None) for i in range(len(requests))}
    for events in generation:
        for e in events:
            tokens, texts, _ = out[e.request]
            tokens.append(e.token)
            texts.append(e.text)
            out[e.request] = (tokens, texts, e.finish_reason)
    return [(tokens, "".join(texts), reason) for tokens, texts, reason in out.values()], generation


def test_greedy_equals_the_official_sampler(official, tokenizer):
    import sentencepiece
    from recurrentgemma.torch import Sampler

    official_model_, ours = official
    text = "The quick brown fox jumps over the lazy dog"
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path))
    reference = Sampler(official_model_, vocab, greedy_sampling=True)
    expected = reference([text], total_generation_steps=30, end_sampling_at_eos_token=False).tokens[0].tolist()
    prompt = tokenizer.encode(text, bos=True)
    [(tokens, _, reason)], _ = run(ours, tokenizer, [Request(prompt, GREEDY, max_tokens=30, ignore_eos=True)])
    assert tokens == expected[-30:]
    assert reason == "length"


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_batch_rows_equal_single_runs(model, tokenizer, sampling):
    prompts = [tokenizer.encode(t, bos=True) for t in ("Once upon a time", "A", "Numbers 1234 and more words here")]
    requests = [Request(p, sampling, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, (12, 20, 5))]
    batch, _ = run(model, tokenizer, requests)
    for request, row in zip(requests, batch):
        [alone], _ = run(model, tokenizer, [request])
        assert row == alone
    assert [len(tokens) for tokens, _, _ in batch] == [12, 20, 5]  # each row stopped on its own


def test_stop_token_ends_only_its_row(model, tokenizer):
    prompt = tokenizer.encode("It was the best of times", bos=True)
    [(free, _, _)], _ = run(model, tokenizer, [Request(prompt, GREEDY, max_tokens=15, ignore_eos=True)])
    # Pretend the 5th generated token is a stop token by making it eos for this run.
    stopper = type(tokenizer)(tokenizer.path)
    stopper.eos_id = free[4]
    first = free.index(free[4])
    results, _ = run(model, stopper, [Request(prompt, GREEDY, max_tokens=15), Request(prompt, GREEDY, max_tokens=15, ignore_eos=True)])
    (stopped, _, reason), (running, _, _) = results
    assert stopped == free[: first + 1] and reason == "stop"
    assert running == free


def test_stop_string_across_token_boundaries(model, tokenizer):
    prompt = tokenizer.encode("The river ran", bos=True)
    diverse = SamplingParams(temperature=1.0, seed=3)  # random weights: greedy text is degenerate
    [(tokens, text, _)], _ = run(model, tokenizer, [Request(prompt, diverse, max_tokens=40, ignore_eos=True)])
    ends = [len(tokenizer.decode(tokens[: k + 1])) for k in range(len(tokens))]
    # A stop string made of the last two characters of one token's text and the
    # first two of the next one's, first found exactly at that boundary.
    k = next(k for k in range(1, len(tokens) - 1)
             if ends[k] - ends[k - 1] >= 2 and ends[k + 1] - ends[k] >= 2
             and text.index(text[ends[k] - 2 : ends[k] + 2]) == ends[k] - 2)
    stop = text[ends[k] - 2 : ends[k] + 2]
    [(cut_tokens, cut, reason)], _ = run(model, tokenizer, [Request(prompt, diverse, max_tokens=40, stop=[stop])])
    assert reason == "stop" and cut == text[: ends[k] - 2]
    assert cut_tokens == tokens[: k + 2]  # it stopped on the token that completed the stop string


def test_stop_strings_hold_back_only_what_may_start_a_stop():
    stops = StopStrings(["</s>", "END"])
    assert stops.feed("hello <") == ("hello ", False)
    assert stops.feed("/x") == ("</x", False)
    assert stops.feed(" E") == (" ", False)
    assert stops.feed("NDING") == ("", True)


def test_snapshot_fork_and_resume_equal_an_uninterrupted_run(model, tokenizer, tmp_path):
    prompt = tokenizer.encode("In the beginning", bos=True)
    follow = tokenizer.encode(" there was")
    [(whole, _, _)], _ = run(model, tokenizer, [Request(prompt + follow, SAMPLED, max_tokens=25, ignore_eos=True)])

    snapshot = prefill(model, [prompt])
    forks = [snapshot.clone(), snapshot.clone()]
    snapshot.save(tmp_path / "prompt.safetensors", model)
    resumed = Context.load(tmp_path / "prompt.safetensors", model)
    for context in [*forks, resumed]:
        [(tokens, _, _)], _ = run(model, tokenizer, [Request(follow, SAMPLED, max_tokens=25, ignore_eos=True)], context)
        assert tokens == whole

    # A context kept at the end of a generation continues like the uninterrupted run too.
    [(first, _, _)], generation = run(
        model, tokenizer, [Request(prompt + follow, SAMPLED, max_tokens=10, ignore_eos=True, keep_context=True)])
    assert first == whole[:10]
    kept = generation.contexts[0]
    assert kept.tokens[0] == prompt + follow + first
    greedy_on, _ = run(model, tokenizer, [Request([], GREEDY, max_tokens=5, ignore_eos=True)], kept.clone())
    full, _ = run(model, tokenizer, [Request(prompt + follow + first, GREEDY, max_tokens=5, ignore_eos=True)])
    assert greedy_on[0][0] == full[0][0]


def test_state_file_of_another_model_is_refused(model, tokenizer, tmp_path):
    prefill(model, [tokenizer.encode("Hello", bos=True)]).save(tmp_path / "s.safetensors", model)
    other = rgemma.Griffin(CONFIG)
    with pytest.raises(StateFileError, match="another model"):
        Context.load(tmp_path / "s.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(StateFileError, match="bad.safetensors"):
        Context.load(tmp_path / "bad.safetensors", model)


def test_long_prompt_reads_in_chunks(model, tokenizer):
    prompt = tokenizer.encode("word " * 3000, bos=True)
    chunks = []
    context = prefill(model, [prompt], chunk_size=1024, progress=chunks.append)
    assert sum(chunks) == len(prompt) and len(chunks) == -(-len(prompt) // 1024)
    whole = prefill(model, [prompt], chunk_size=len(prompt))
    torch.testing.assert_close(context.logits, whole.logits, rtol=0, atol=1e-4)


def test_chat_turn_reads_only_its_own_tokens(model, tokenizer):
    chat = Chat(Engine(model, tokenizer), GREEDY, max_tokens=8, system="Be brief.")
    out = io.StringIO()
    first = chat.reply("Tell me a long story about the sea and the sky.", out)
    history = list(chat.context.tokens[0])
    second_message = "And then?"
    turn = chat.turn_tokens(second_message)
    second = chat.reply(second_message, out)
    assert first.stats.prompt_tokens > len(turn)
    assert second.stats.prompt_tokens == len(turn)  # not the history
    generated = [t for t in chat.context.tokens[0][len(history) + len(turn) :]]
    assert chat.context.tokens[0] == history + turn + generated
    assert len(generated) == second.stats.generated_tokens


def test_invalid_requests():
    with pytest.raises(ValueError, match="max_tokens must be at least 0"):
        Request([1], max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


@pytest.mark.slow
def test_a_100k_token_prompt(model, tokenizer):
    prompt = [tokenizer.bos_id] + tokenizer.encode("the sea and the sky ") * 20_000
    assert len(prompt) > 100_000
    context = prefill(model, [prompt])
    assert torch.isfinite(context.logits).all()
    assert context.state.nbytes == model.init_state(1).nbytes
    [(tokens, _, _)], _ = run(model, tokenizer, [Request([], GREEDY, max_tokens=5, ignore_eos=True)], context)
    assert len(tokens) == 5
