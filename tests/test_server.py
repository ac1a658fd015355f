"""`rgemma serve`: the real server on a free loopback port, talked to by the official `openai` client and raw HTTP.

Outputs must not depend on batching or on the prefix cache: every request
here is compared, token for token, with the same request through the engine
alone (`alone`), or with itself sent alone to a server without a cache.
"""

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

import rgemma
from rgemma.engine import Engine, Request
from rgemma.hub import DEFAULT_MODEL
from rgemma.sampling import SamplingParams
from rgemma.server.app import Settings, create_app
from rgemma.tokenizer import Tokenizer, chat_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "rgemma-small"
CHUNK = 16  # small prefill chunks, so that prompts take several ticks and meet running streams


@pytest.fixture(scope="module")
def default():
    return rgemma.load_model(DEFAULT_MODEL).eval(), Tokenizer.find(DEFAULT_MODEL)


@contextlib.contextmanager
def serving(default, engine=None, **settings):
    """A real uvicorn server on a free loopback port, its model warmed up: yields (base url, app)."""
    model, tokenizer = default
    engine = engine or Engine(model, tokenizer, chunk_size=CHUNK, max_batch=settings.pop("max_batch", 32))
    app = create_app(engine, Settings(model_name=NAME, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        assert app.state.worker.ready.wait(120)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(default):
    with serving(default) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def alone(default, prompt: list[int], max_tokens: int, stop=(), **sampling) -> tuple[list[int], str, str]:
    """The request through a fresh engine of its own: (tokens, text, finish reason)."""
    model, tokenizer = default
    engine = Engine(model, tokenizer, chunk_size=CHUNK)
    request_id = engine.add(Request(prompt, SamplingParams(**sampling), max_tokens, stop))
    tokens, text, reason = [], [], None
    while engine.in_flight(request_id):
        for event in engine.step():
            tokens.append(event.token)
            text.append(event.text)
            reason = event.finish_reason
    return tokens, "".join(text), reason


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def messages_of(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# The openai client --------------------------------------------------------------------


def test_chat_completion_equals_the_engine_alone(default, client):
    _, tokenizer = default
    messages = messages_of("Tell me about the weather.")
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    tokens, text, reason = alone(default, chat_prompt(tokenizer, messages), 12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == reason
    prompt_tokens = len(chat_prompt(tokenizer, messages))
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == prompt_tokens + len(tokens)
    assert reply.model == NAME and reply.object == "chat.completion"


def test_streamed_chat_equals_the_whole_reply_and_ends_with_usage(default, client):
    messages = messages_of("Write a line about the sea.")
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, seed=4, temperature=0.9)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, seed=4,
                                                 temperature=0.9, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_text_completion_with_stop_and_logprobs(default, client):
    _, tokenizer = default
    prompt = "It was a fine morning, and"
    free = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    stop = free.choices[0].text[5:8]
    assert stop.strip(), "the test needs a stop string inside the free text"
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                      logprobs=3)
    tokens, text, reason = alone(default, tokenizer.encode(prompt, bos=True), 16, stop=[stop], temperature=0,
                                 logprobs=3)
    choice = reply.choices[0]
    assert choice.text == text == free.choices[0].text[: free.choices[0].text.index(stop)]
    assert choice.finish_reason == reason == "stop"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(tokens) == reply.usage.completion_tokens
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    # Greedy: each chosen token is its step's most likely one.
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and max(top.values()) == pytest.approx(value)
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs_name_their_tokens(client):
    reply = client.chat.completions.create(model=NAME, messages=messages_of("Hello"), max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token
        assert [alt.token for alt in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 2


def test_n_choices_are_forked_from_one_prefill_and_seeded_by_index(default, client, server):
    _, tokenizer = default
    prompt = "The old house on the hill"
    hits = metric(server[0], "rgemma_prefill_tokens_total")
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, n=3, seed=11, temperature=1.0)
    ids = tokenizer.encode(prompt, bos=True)
    assert metric(server[0], "rgemma_prefill_tokens_total") - hits <= len(ids)  # read once, not three times
    texts = [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [alone(default, ids, 10, temperature=1.0, seed=11 + i)[1] for i in range(3)]
    assert len(set(texts)) > 1


def test_models_lists_the_served_model_and_others_are_not_found(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=messages_of("hi"), max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_a_failed_warm_up_is_reported_not_waited_on(default, monkeypatch):
    """A model whose first step fails (a bug, or out of memory) must not leave the server warming up forever."""
    model, tokenizer = default
    engine = Engine(model, tokenizer, chunk_size=CHUNK)
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("no memory for the state")))
    app = create_app(engine, Settings(model_name=NAME))
    with TestClient(app) as http:
        assert app.state.worker.settled.wait(60)
        assert not app.state.worker.ready.is_set()
        health = http.get("/health")
    assert health.status_code == 500
    assert health.json()["status"] == "failed"
    assert "RuntimeError: no memory for the state" in health.json()["reason"]


def test_health_and_metrics(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ready"}
    before = metric(url, "rgemma_generation_tokens_total")
    client.completions.create(model=NAME, prompt="Count", max_tokens=5, temperature=0, extra_body={"ignore": 1})
    assert metric(url, "rgemma_generation_tokens_total") - before == 5
    text = httpx.get(url + "/metrics").text
    for name in ["rgemma_requests_total", "rgemma_prompt_tokens_total", "rgemma_running_requests",
                 "rgemma_queued_requests", "rgemma_time_to_first_token_seconds_bucket",
                 "rgemma_inter_token_latency_seconds_bucket", "rgemma_prefix_cache_hits_total",
                 "rgemma_prefix_cache_bytes"]:
        assert name in text
    assert 'rgemma_requests_total{endpoint="/v1/completions",status="200"}' in text


# Batching -------------------------------------------------------------------------------


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(default, server):
    """Different prompts, lengths, stops and seeds, all at once; each equals the engine alone."""
    _, tokenizer = default
    words = ["river", "king", "letter", "garden", "winter", "ship", "law", "church"]
    cases = []
    for i in range(16):
        prompt = f"The {words[i % 8]} of the {words[(3 * i) % 8]} was" + " very" * (i % 5)
        sampling = {"temperature": 0.0} if i % 3 == 0 else {"temperature": 0.8, "seed": 100 + i}
        cases.append((prompt, 4 + 3 * i, [" the "] if i % 4 == 1 else [], sampling))

    async def one(client, prompt, max_tokens, stop, sampling):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, stop=stop or None,
                                                 stream=True, **sampling)
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), [r for r in reasons if r]

    async def everyone():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, *case) for case in cases))

    results = asyncio.run(everyone())
    for (prompt, max_tokens, stop, sampling), (text, reasons) in zip(cases, results):
        _, expected, reason = alone(default, tokenizer.encode(prompt, bos=True), max_tokens, stop, **sampling)
        assert (text, reasons) == (expected, [reason]), prompt
    assert metric(server[0], "rgemma_running_requests") == 0


def test_a_closed_stream_frees_its_slot_at_once(server, client):
    url, _ = server
    stream = client.completions.create(model=NAME, prompt="Once", max_tokens=4000, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert metric(url, "rgemma_running_requests") == 1
    stream.close()
    deadline = time.monotonic() + 10
    while metric(url, "rgemma_running_requests") != 0:
        assert time.monotonic() < deadline, "the closed stream still holds its slot"
        time.sleep(0.05)


def test_a_full_queue_answers_503_with_retry_after(default):
    with serving(default, max_batch=1, max_queue=1) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        running = client.completions.create(model=NAME, prompt="One", max_tokens=4000, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))  # in the batch, the only slot
        waiting = httpx.Client(timeout=30)
        with waiting.stream("POST", url + "/v1/completions",
                            json={"model": NAME, "prompt": "Two", "max_tokens": 3, "stream": True}):
            deadline = time.monotonic() + 10
            while metric(url, "rgemma_queued_requests") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "Three", "max_tokens": 3})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            running.close()


# The prefix cache -------------------------------------------------------------------------


def converse(url: str, turns: list[str]) -> tuple[list[str], list[int], list[int]]:
    """A greedy multi-turn chat: (replies, cached tokens per turn, prompt tokens per turn)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages, replies, cached, prompts = [{"role": "system", "content": "Be brief."}], [], [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
        text = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        replies.append(text)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        prompts.append(reply.usage.prompt_tokens)
    return replies, cached, prompts


def test_a_five_turn_chat_reads_only_its_new_tokens_and_says_the_same(default):
    _, tokenizer = default
    turns = ["Where is the river?", "And the king?", "Who wrote the letter?", "What grows in the garden?",
             "When does winter come?"]
    with serving(default, cache_bytes=0) as (url, _):
        uncached, nothing, _ = converse(url, turns)
    assert nothing == [0] * 5
    with serving(default) as (url, _):
        before = metric(url, "rgemma_prefill_tokens_total")
        replies, cached, prompts = converse(url, turns)
        read = metric(url, "rgemma_prefill_tokens_total") - before
    assert replies == uncached
    # Each later turn's new tokens: its user turn and the prompt for the reply.
    new = [len(chat_prompt(tokenizer, [{"role": "user", "content": t}])) - 1 for t in turns[1:]]
    assert cached[0] == 0
    assert [p - c for p, c in zip(prompts[1:], cached[1:])] == new
    assert read == prompts[0] + sum(new)


def test_a_prompt_sharing_a_long_prefix_starts_from_its_snapshot(default, server, client):
    url, _ = server
    document = " ".join(["The assembly met in the old hall and heard the report of the committee."] * 6)
    first = client.completions.create(model=NAME, prompt=document + " First,", max_tokens=8, temperature=0)
    second = client.completions.create(model=NAME, prompt=document + " Second,", max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= CHUNK and cached % CHUNK == 0 and cached > second.usage.prompt_tokens - CHUNK - 4
    _, tokenizer = default
    expected = alone(default, tokenizer.encode(document + " Second,", bos=True), 8, temperature=0)[1]
    assert second.choices[0].text == expected


# Bad input -----------------------------------------------------------------------------------


def post(url: str, body, path="/v1/chat/completions", **options) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, **options)
    return httpx.post(url + path, json=body, **options)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": NAME}, "messages"),
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "seed": -3}, "seed"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_chat_requests_get_an_error_naming_the_field(server, body, param):
    response = post(server[0], body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    if param:
        assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": NAME, "prompt": ""}, "prompt"),
    ({"model": NAME, "prompt": [1, 99999]}, "prompt"),
    ({"model": NAME, "prompt": [1, -2]}, "prompt"),
    ({"model": NAME, "prompt": "x" * 40000}, "prompt"),
    ({"model": NAME, "prompt": "hi", "logprobs": 99}, "logprobs"),
])
def test_bad_completion_requests_get_an_error_naming_the_field(server, body, param):
    response = post(server[0], body, path="/v1/completions")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_oversized_body_gets_413_and_the_server_serves_on(default):
    with serving(default, max_body_bytes=1000) as (url, _):
        response = post(url, {"model": NAME, "messages": [{"role": "user", "content": "x" * 2000}]})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        ok = post(url, {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200


def test_an_api_key_is_required_when_set(default):
    with serving(default, api_key="sesame") as (url, _):
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert post(url, body).status_code == 401
        wrong = post(url, body, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert post(url, body, headers={"Authorization": "Bearer sesame"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200


def test_unknown_paths_get_the_error_object(server):
    response = httpx.get(server[0] + "/v1/engines")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# The command --------------------------------------------------------------------------------------


def test_serve_help_shows_curl_and_openai_examples():
    result = subprocess.run([sys.executable, "-m", "rgemma.cli", "serve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in result.stdout and "OpenAI(base_url=" in result.stdout


def test_rgemma_serve_warms_up_then_answers(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen([sys.executable, "-m", "rgemma.cli", "serve", "--port", str(port), "--threads", "1"],
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "ready" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in line
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ready"}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=NAME, messages=messages_of("hi"), max_tokens=3)
        assert reply.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(30)


def resident_bytes() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.slow
def test_a_thousand_requests_leave_memory_flat(default):
    """Chats, completions, streams and abandoned streams; the cache fills and evicts; RSS stays where it was."""
    with serving(default, cache_bytes=4 << 20) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def request(i: int) -> None:
            if i % 4 == 0:
                client.chat.completions.create(model=NAME, messages=messages_of(f"Question {i}?"), max_tokens=8)
            elif i % 4 == 1:
                client.completions.create(model=NAME, prompt=f"Line {i} of the", max_tokens=8, n=2, seed=i)
            elif i % 4 == 2:
                stream = client.completions.create(model=NAME, prompt=f"Story {i}", max_tokens=64, stream=True,
                                                   extra_body={"ignore_eos": True})
                next(iter(stream))
                stream.close()  # abandoned after the first token
            else:
                list(client.completions.create(model=NAME, prompt=f"Item {i}", max_tokens=8, stream=True))

        def run(indices) -> None:
            threads = [threading.Thread(target=lambda part=part: [request(i) for i in part])
                       for part in (indices[k::8] for k in range(8))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        run(list(range(200)))
        before = resident_bytes()
        run(list(range(200, 1000)))
        deadline = time.monotonic() + 10
        while metric(url, "rgemma_running_requests") or metric(url, "rgemma_queued_requests"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        grown = resident_bytes() - before
        assert grown < 32 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 800 requests"
        assert metric(url, "rgemma_prefix_cache_bytes") <= 4 << 20
        assert app.state.worker.engine.capacity <= 32


def test_a_failure_inside_the_engine_fails_its_requests_and_the_server_serves_on(default):
    with serving(default) as (url, app):
        worker = app.state.worker
        step = type(worker.engine).step

        def broken(engine):
            type(engine).step = step  # once
            raise RuntimeError("injected")

        type(worker.engine).step = broken
        try:
            failed = post(url, {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        finally:
            type(worker.engine).step = step
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        ok = post(url, {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_client_that_leaves_before_its_whole_answer_frees_its_slot(server):
    url, _ = server
    body = json.dumps({"model": NAME, "prompt": "Long", "max_tokens": 4000, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while metric(url, "rgemma_running_requests") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while metric(url, "rgemma_running_requests") != 0:
        assert time.monotonic() < deadline, "the request of a client that left still runs"
        time.sleep(0.05)


def test_serve_applies_an_adapter_as_the_merged_model_would(default, tmp_path):
    """`rgemma serve --adapter DIR` loads through load_engine, as generate and chat do."""
    import argparse

    from rgemma.cli.options import load_engine
    from rgemma.lora import LoraSettings, add_lora, adapter_parameters, adapter_tensors, merge_lora, save_adapter

    settings = LoraSettings(rank=4, alpha=8.0)
    adapted = rgemma.load_model(DEFAULT_MODEL)
    add_lora(adapted, settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in adapter_parameters(adapted):
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    save_adapter(adapter_tensors(adapted), settings, tmp_path / "adapter")
    merged = merge_lora(adapted).eval()
    args = argparse.Namespace(model=None, adapter=str(tmp_path / "adapter"), dtype=None, quantize=None,
                              group_size=None, threads=None)
    engine = load_engine(args, chunk_size=CHUNK)
    _, tokenizer = default
    messages = messages_of("Tell me about the river.")
    with serving(default, engine=engine) as (url, _):
        reply = post(url, {"model": NAME, "messages": messages, "max_tokens": 12, "temperature": 0}).json()
    text = reply["choices"][0]["message"]["content"]
    assert text == alone((merged, tokenizer), chat_prompt(tokenizer, messages), 12, temperature=0)[1]
    assert text != alone(default, chat_prompt(tokenizer, messages), 12, temperature=0)[1]
