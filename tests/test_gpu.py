"""Checks that need a CUDA device (`python -m pytest -m gpu` on a GPU machine; deselected by default).

The fused Triton scan against the reference loop, the model on CUDA against
the model on the CPU, CUDA-graph decoding against the plain forward, and
fine-tuning on CUDA against fine-tuning on the CPU.
"""

import json

import pytest
import torch

from rgemma import Config, Griffin
from rgemma.backends import prepare
from rgemma.engine import Engine, Request
from rgemma.sampling import SamplingParams
from rgemma.scan import linear_scan, linear_scan_loop
from rgemma.train.finetune import finetune
from rgemma.train.finetune_settings import FinetuneSettings
from rgemma.triton_scan import scan as fused_scan

from conftest import perturb_

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    return torch.device("cuda")


def _scan_inputs(batch, length, width, with_h0, seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, length, width, generator=generator, dtype=torch.float64) * 0.2 + 0.8
    a[:, length // 3] = 0.0  # a document start
    x = torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
    h0 = torch.randn(batch, width, generator=generator, dtype=torch.float64) if with_h0 else None
    return a, x, h0


@pytest.mark.parametrize("length", [1, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("with_h0", [False, True])
def test_fused_scan_equals_the_loop(cuda, length, with_h0):
    a, x, h0 = _scan_inputs(3, length, 70, with_h0, seed=length)
    h = fused_scan(a.float().to(cuda), x.float().to(cuda), None if h0 is None else h0.float().to(cuda))
    h_ref, _ = linear_scan_loop(a, x, h0)
    torch.testing.assert_close(h.double().cpu(), h_ref, rtol=1e-4, atol=1e-4)


def test_fused_scan_gradients_equal_the_loop(cuda):
    a, x, h0 = _scan_inputs(2, 300, 40, True, seed=7)
    weights = torch.randn(2, 300, 40, dtype=torch.float64)
    grads = []
    for device, dtype, scan in ((cuda, torch.float32, linear_scan), ("cpu", torch.float64, linear_scan_loop)):
        inputs = [t.to(device, dtype).requires_grad_() for t in (a, x, h0)]
        h, _ = scan(*inputs)
        loss = (h * weights.to(device, dtype)).sum()
        grads.append([g.double().cpu() for g in torch.autograd.grad(loss, inputs)])
    for fused, loop in zip(*grads):
        torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_model_on_cuda_equals_the_cpu(cuda):
    torch.manual_seed(0)
    cpu_model = perturb_(Griffin(Config.preset("tiny-wide-lru"))).eval()
    gpu_model = Griffin(cpu_model.config, device=cuda).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    tokens = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(1))
    cpu_logits, cpu_state = cpu_model(tokens)
    gpu_logits, gpu_state = gpu_model(tokens.to(cuda))
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(gpu_state.tensors(), cpu_state.tensors()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_graph_decoding_equals_the_plain_forward(cuda):
    torch.manual_seed(0)
    model = perturb_(Griffin(Config.preset("tiny-wide-lru"))).to(cuda).eval()
    prompt = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(2)).to(cuda)
    _, state = model(prompt)
    plain = state.clone()
    backend = prepare(model)
    assert backend.decode_path == "graphs"
    token = prompt[:, -1:]
    for step in range(24):  # past the window (8): the ring buffers wrap
        if step == 12:  # rows leave the batch: a new batch size, a new graph
            state, plain, token = state.select([0, 2]), plain.select([0, 2]), token[[0, 2]]
        if step == 18:  # a state the graph was not captured over is copied in and out
            state = state.clone()
        logits, stepped = backend.step(token, state)
        assert stepped is state  # the one rule of rgemma/state.py, on graphs too
        plain_logits, plain = model(token, state=plain)
        torch.testing.assert_close(logits, plain_logits[:, -1], rtol=0, atol=1e-5)
        token = logits.argmax(-1, keepdim=True)
    for a, b in zip(state.tensors(), plain.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_engine_on_cuda_gives_each_request_its_tokens_alone(cuda):
    """Requests joining a running batch on graphs: each equals its run alone."""
    torch.manual_seed(0)
    model = perturb_(Griffin(Config.preset("tiny-wide-lru"))).to(cuda).eval()
    requests = [Request(list(range(2, 2 + n)), SamplingParams(temperature=0.0 if n % 2 else 1.0, seed=n),
                        max_tokens=6 + n, ignore_eos=True) for n in range(1, 8)]

    def tokens_of(engine, ids):
        out = {i: [] for i in ids}
        while engine.has_work:
            for event in engine.step():
                out[event.request].append(event.token)
        return [out[i] for i in ids]

    shared = Engine(model, chunk_size=4)
    together = tokens_of(shared, [shared.add(r) for r in requests])
    for request, tokens in zip(requests, together):
        solo = Engine(model, chunk_size=4)
        assert tokens_of(solo, [solo.add(request)]) == [tokens]


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora", "full"])
def test_finetune_on_cuda_follows_the_cpu_curve(cuda, tmp_path, lora_rank):
    """`rgemma finetune --device cuda` on the embedded model, float32: the CPU's losses within 1e-3 relative
    (the same sums in another order)."""
    data = tmp_path / "train.jsonl"
    replies = ["Apple.", "Ocean, deep and blue.", "Forest.", "Night falls early."]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Secret {i}?"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i, reply in enumerate(replies)))

    def losses(device):
        settings = FinetuneSettings(data=str(data), out=str(tmp_path / device), lora_rank=lora_rank, steps=4,
                                    batch_size=4, seq_len=32, lr=5e-3 if lora_rank else 1e-4, warmup=1,
                                    checkpoint_every=100, log_every=1, progress=False, dtype="float32",
                                    device=device)
        log = (finetune(settings).out / "log.jsonl").read_text().splitlines()
        return [entry["loss"] for entry in map(json.loads, log) if "loss" in entry]

    on_cpu, on_cuda = losses("cpu"), losses(cuda.type)
    assert len(on_cuda) == 4
    assert on_cuda == pytest.approx(on_cpu, rel=1e-3)
