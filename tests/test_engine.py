"""The long-lived engine: requests join, leave and are cancelled mid-flight, and none sees the others.

Each request's tokens must equal, token for token, those it gets alone, on
the native CPU step and on the plain path: a request is prefilled alone in
position-aligned chunks, every row of a decode step is computed on its own,
and every request samples from its own generator.
"""

import asyncio
import random
import threading
import time

import pytest
import torch

import rgemma
from rgemma.backends import Options, prepare
from rgemma.backends.native import kernels
from rgemma.engine import Engine, Request
from rgemma.hub import DEFAULT_MODEL
from rgemma.sampling import SamplingParams
from rgemma.tokenizer import Tokenizer
from conftest import LowRankAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 8  # small prefill chunks, so that prompts take several ticks and join mid-flight
PATHS = [pytest.param(True, marks=pytest.mark.skipif(kernels() is None, reason="no native CPU kernels here"),
                      id="native"),
         pytest.param(False, id="plain")]


@pytest.fixture(scope="module")
def default():
    return rgemma.load_model(DEFAULT_MODEL).eval(), Tokenizer.find(DEFAULT_MODEL)


def engine(default, native: bool, **options) -> Engine:
    model, tokenizer = default
    backend = prepare(model, options=Options(native_kernels=native))
    return Engine(model, tokenizer, backend=backend, chunk_size=CHUNK, **options)


def drain(engine: Engine, ids) -> dict[int, tuple[list[int], str, str]]:
    """Step until the given requests are done: {id: (tokens, text, finish_reason)}."""
    out = {i: ([], [], None) for i in ids}
    while any(engine.in_flight(i) for i in ids):
        for event in engine.step():
            tokens, texts, _ = out[event.request]
            tokens.append(event.token)
            texts.append(event.text)
            out[event.request] = (tokens, texts, event.finish_reason)
    return {i: (tokens, "".join(texts), reason) for i, (tokens, texts, reason) in out.items()}


def alone(default, native: bool, request: Request):
    solo = engine(default, native)
    request_id = solo.add(request)
    return drain(solo, [request_id])[request_id]


def mixed_requests(tokenizer, count: int) -> list[Request]:
    """Requests of many kinds: greedy and seeded, short and multi-chunk prompts, budgets, stop strings."""
    texts = ["It was a fine morning, and", "The sea", "Once upon a time there lived a king who had three sons, "
             "and the youngest of them was", "She said", "In the beginning"]
    requests = []
    for i in range(count):
        prompt = tokenizer.encode(texts[i % len(texts)] + " " * (i % 3), bos=True)
        sampling = SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.9, top_p=0.95, seed=i)
        stop = [" the"] if i % 4 == 0 else []
        requests.append(Request(prompt, sampling, max_tokens=4 + (7 * i) % 23, stop=stop))
    return requests


@pytest.mark.parametrize("native", PATHS)
def test_requests_joining_mid_flight_equal_each_alone(default, native):
    """17 requests: 5 at the start, the others one per step as the first ones run, two cancelled midway."""
    _, tokenizer = default
    requests = mixed_requests(tokenizer, 17)
    shared = engine(default, native)
    ids = [shared.add(r) for r in requests[:5]]
    cancelled = set()
    out = {i: [] for i in range(len(requests))}
    steps = 0
    while shared.has_work or len(ids) < len(requests):
        if len(ids) < len(requests):
            ids.append(shared.add(requests[len(ids)]))
        if steps == 6:
            for index in (2, 7):
                assert shared.cancel(ids[index])
                cancelled.add(index)
        for event in shared.step():
            out[ids.index(event.request)].append(event.token)
        steps += 1
    assert shared.running == 0 and shared.waiting == 0
    for index, request in enumerate(requests):
        if index in cancelled:
            continue
        tokens, _, _ = alone(default, native, request)
        assert out[index] == tokens, f"request {index}"


@pytest.fixture(scope="module")
def adapted():
    """The default model with an adapter on one linear: the native step cannot take it, the plain path runs."""
    model = rgemma.load_model(DEFAULT_MODEL).eval()
    torch.manual_seed(0)
    model.layers[0].mlp_block.up_proj = LowRankAdapter(model.layers[0].mlp_block.up_proj)
    return model, Tokenizer.find(DEFAULT_MODEL)


@pytest.mark.parametrize("native", PATHS)
def test_a_request_alone_and_among_sixteen_others(default, native):
    _, tokenizer = default
    probe = Request(tokenizer.encode("The king said to his daughter", bos=True), SamplingParams(temperature=0.8,
                    seed=3), max_tokens=24, ignore_eos=True)
    crowd = engine(default, native)
    others = [crowd.add(r) for r in mixed_requests(tokenizer, 16)]
    probe_id = crowd.add(probe)
    result = drain(crowd, [*others, probe_id])[probe_id]
    assert result == alone(default, native, probe)


@pytest.mark.skipif(kernels() is None, reason="no native CPU kernels here")
def test_among_sixteen_others_on_the_plain_path_with_native_products(adapted):
    """With an adapter the step is the modules' own forward, whose products still use the native kernels for
    up to 16 rows: run in groups of 16, each row's products are the same kernel's whatever the batch."""
    assert engine(adapted, True).backend.decode_path == "plain"
    test_a_request_alone_and_among_sixteen_others(adapted, True)


def test_prompts_that_arrive_together_hold_running_requests_for_one_forward_a_tick(default):
    """While a request runs, a tick reads one prompt forward: the running request gets a token every tick,
    however many prompts arrive at once. With nothing running, short prompts are read together in one tick."""
    _, tokenizer = default

    def request(text: str, max_tokens: int = 3) -> Request:
        return Request(tokenizer.encode(text, bos=True), SamplingParams(temperature=0), max_tokens=max_tokens,
                       ignore_eos=True)

    busy = engine(default, kernels() is not None)
    first = busy.add(request("Once upon", max_tokens=40))
    busy.step()  # nothing ran: reads its prompt and samples its first token
    assert busy.running == 1
    for _ in range(5):
        busy.add(request("The cat"))  # shorter than a chunk: one forward each
    for tick in range(5):
        events = busy.step()
        assert any(event.request == first for event in events), tick  # a token every tick
        assert busy.waiting == 4 - tick
    idle = engine(default, kernels() is not None)
    for _ in range(5):
        idle.add(request("The cat"))
    idle.step()
    assert idle.running > 1  # as many as a chunk's worth of prompt tokens (CHUNK) takes


def test_cancel_frees_the_slot_at_once(default):
    _, tokenizer = default
    shared = engine(default, kernels() is not None)
    request = Request(tokenizer.encode("It was", bos=True), SamplingParams(temperature=0.0), max_tokens=50,
                      ignore_eos=True)
    ids = [shared.add(request) for _ in range(3)]
    while shared.running < 3:
        shared.step()
    assert shared.cancel(ids[1])
    assert shared.running == 2 and not shared.in_flight(ids[1])
    assert not shared.cancel(ids[1])  # not in flight any more
    assert all(e.request != ids[1] for e in shared.step())
    waiting = shared.add(request)
    assert shared.cancel(waiting) and shared.waiting == 0  # a request still reading its prompt


def test_no_slot_leaks_over_a_thousand_random_events(default):
    """Adds, cancels and finishes in random order: every slot is given back, and the pool stays bounded."""
    _, tokenizer = default
    rng = random.Random(0)
    shared = engine(default, kernels() is not None, max_batch=6)
    live, finished, cancelled, added = set(), set(), set(), 0
    events = 0
    while events < 1000:
        if rng.random() < 0.35:
            prompt = tokenizer.encode("The sea" + " x" * rng.randrange(12), bos=True)
            live.add(shared.add(Request(prompt, SamplingParams(temperature=1.0, seed=added),
                                        max_tokens=rng.randrange(1, 9), ignore_eos=rng.random() < 0.5)))
            added += 1
            events += 1
        if live and rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            assert shared.cancel(victim)
            live.discard(victim)
            cancelled.add(victim)
            events += 1
        for event in shared.step():
            assert event.request in live
            if event.finish_reason is not None:
                live.discard(event.request)
                finished.add(event.request)
                events += 1
        assert shared.running <= 6 and shared.capacity <= 6
        assert shared.running + shared.waiting == len(live)
    drain(shared, sorted(live))
    assert not shared.has_work and shared.running == 0 and shared.waiting == 0
    assert len(finished) + len(cancelled) + len(live) == added
    assert not any(shared.in_flight(i) for i in range(added))


def test_a_request_stops_at_its_own_stop_tokens(default):
    """Token ids of the request's own end a request at the first one, even with the model's end tokens ignored."""
    _, tokenizer = default
    prompt = tokenizer.encode("It was a fine morning, and", bos=True)
    free, _, _ = alone(default, False, Request(prompt, SamplingParams(temperature=0.0), max_tokens=12,
                                               ignore_eos=True))
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    tokens, _, reason = alone(default, False, Request(prompt, SamplingParams(temperature=0.0), max_tokens=12,
                                                      ignore_eos=True, stop_tokens=[free[at]]))
    assert tokens == free[: at + 1] and reason == "stop"


def test_empty_prompt_and_tokens_outside_the_vocabulary_are_refused(default):
    shared = engine(default, False)
    with pytest.raises(ValueError, match="empty prompt"):
        shared.add(Request([]))
    vocab = shared.model.config.vocab_size
    with pytest.raises(ValueError, match=f"token {vocab} is outside the vocabulary of {vocab}"):
        shared.add(Request([2, vocab]))
    assert not shared.has_work


def test_the_backend_says_how_it_serves_the_model(default):
    model, _ = default  # bf16 weights
    described = prepare(model, options=Options(native_kernels=False, native_bf16=False)).describe()
    assert described == {"backend": "cpu", "device": "cpu", "weights": "bfloat16", "activations": "float32",
                         "decode": "plain", "cpu_level": "none (plain PyTorch)"}
    native_bf16 = prepare(model, options=Options(native_kernels=False, native_bf16=True))
    assert native_bf16.describe()["activations"] == "bfloat16"
    if kernels() is not None:
        assert prepare(model).describe()["decode"] == "native"


@pytest.mark.skipif(kernels() is None, reason="no native CPU kernels here")
def test_an_event_loop_runs_on_while_the_engine_steps_in_another_thread(one_thread):
    """The native step releases the GIL: an asyncio front end in the same process keeps ticking during a step,
    not only between steps (holding the GIL, a 1 ms sleep loop ticks about once per step)."""
    torch.manual_seed(0)
    model = rgemma.Griffin(rgemma.Config.preset("tiny", width=1024, lru_width=1024, mlp_width=4096,
                                                num_heads=8)).eval()  # steps of about 10 ms
    shared = Engine(model)
    shared.add(Request([2, 3, 4], SamplingParams(temperature=0.0), max_tokens=10_000, ignore_eos=True))
    while not shared.running:
        shared.step()
    stop, steps = threading.Event(), []

    def stepping():
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:
            shared.step()
            steps.append(1)
        stop.set()

    async def ticking() -> int:
        ticks = 0
        while not stop.is_set():
            await asyncio.sleep(0.001)
            ticks += 1
        return ticks

    worker = threading.Thread(target=stepping)
    worker.start()
    ticks = asyncio.run(ticking())
    worker.join()
    assert ticks >= 3 * len(steps), (ticks, len(steps))


@pytest.mark.parametrize("native", PATHS)
def test_a_request_from_a_snapshot_equals_one_that_read_the_whole_prompt(default, native):
    """Snapshots come after every chunk, at breaks too; continuing from one gives the same tokens, bit for bit."""
    model, tokenizer = default
    prompt = tokenizer.encode("The snapshot at a turn boundary is the state a later request starts from.", bos=True)
    breaks = [5, 13]  # not multiples of CHUNK
    request = Request(prompt, SamplingParams(temperature=0.9, seed=3), max_tokens=12, breaks=breaks)
    whole = engine(default, native)
    snapshots = []
    whole_id = whole.add(request, snapshot=snapshots.append)
    expected = drain(whole, [whole_id])[whole_id]
    ends = [len(s.tokens[0]) for s in snapshots]
    aligned = list(range(CHUNK, len(prompt), CHUNK))
    assert ends == sorted(set(breaks + aligned + [len(prompt)]))
    for snapshot in snapshots:
        read = len(snapshot.tokens[0])
        assert snapshot.tokens[0] == prompt[:read]
        rest = Request(prompt[read:], request.sampling, max_tokens=12,
                       breaks=[b - read for b in breaks if b > read])
        resumed = engine(default, native)
        resumed_id = resumed.add(rest, context=snapshot)
        assert drain(resumed, [resumed_id])[resumed_id] == expected, f"from the snapshot after {read} tokens"


def test_a_request_for_no_tokens_only_reads_its_prompt(default):
    model, tokenizer = default
    prompt = tokenizer.encode("Only read this.", bos=True)
    reader = engine(default, False)
    request_id = reader.add(Request(prompt, max_tokens=0, keep_context=True))
    events = []
    while reader.in_flight(request_id):
        events += reader.step()
    assert events == [] and reader.running == 0
    context = reader.contexts.pop(request_id)
    logits, _ = model(torch.tensor([prompt]))
    torch.testing.assert_close(context.logits, logits[:, -1])
    assert context.tokens == [prompt] and int(context.state.position[0]) == len(prompt)


def test_breaks_outside_the_prompt_are_refused():
    with pytest.raises(ValueError, match="break 4 is not an offset within the prompt of 3 tokens"):
        Request([1, 2, 3], breaks=[4])
    with pytest.raises(ValueError, match="max_tokens must be at least 0"):
        Request([1, 2, 3], max_tokens=-1)
