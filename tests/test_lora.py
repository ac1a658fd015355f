"""LoRA: targets, the gates' block-diagonal adapters, merge, the PEFT files, and generation with an adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rgemma
from rgemma import Config, Griffin
from rgemma.cli import main
from rgemma.hub import DEFAULT_MODEL
from rgemma.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, add_lora, adapter_parameters, adapter_tensors, load_adapter,
    merge_lora, save_adapter, target_paths,
)
from conftest import perturb_


def tokens(length=24, seed=0):
    return torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters_(model, seed=1, scale=0.2):
    """New adapters leave the model unchanged (B = 0); give them values that change it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(scale * torch.randn(p.shape, generator=generator))


def adapted(base, settings, seed=1):
    model = Griffin(base.config)
    model.load_state_dict(base.state_dict())
    add_lora(model, settings)
    randomise_adapters_(model, seed)
    return model.eval()


@torch.no_grad()
def logits(model, seq):
    return model(seq)[0]


def test_targets_by_pattern_and_a_pattern_that_matches_nothing():
    config = Config.preset("tiny-wide-lru")  # recurrent, recurrent, attention, x2
    assert target_paths(config, ("q_proj",)) == ["layers.2.temporal_block.q_proj", "layers.5.temporal_block.q_proj"]
    assert target_paths(config, ("layers.0.mlp_block.*",)) == [
        f"layers.0.mlp_block.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
    gates = target_paths(config, ("input_gate_weight",))
    assert gates == [f"layers.{i}.temporal_block.rg_lru.input_gate_weight" for i in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match="'qproj' matches nothing"):
        target_paths(config, ("q_proj", "qproj"))


def test_new_adapters_change_nothing_and_only_they_train(tiny):
    seq = tokens()
    expected = logits(tiny, seq)
    paths = add_lora(tiny, LoraSettings(rank=2))
    assert len(paths) == 6 * 3 + 4 * (3 + 2) + 2 * 4  # MLPs; recurrent linears and gates; attention projections
    torch.testing.assert_close(logits(tiny, seq), expected, rtol=0, atol=0)
    trainable = {id(p) for p in tiny.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(tiny)} and trainable


def test_merged_model_equals_base_plus_adapter(tiny):
    model = adapted(tiny, LoraSettings(rank=3, alpha=6.0))
    seq = tokens()
    with_adapter = logits(model, seq)
    assert not torch.allclose(with_adapter, logits(tiny, seq), atol=1e-2)
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(tiny.state_dict())
    torch.testing.assert_close(logits(merged, seq), with_adapter, rtol=1e-5, atol=1e-4)  # float32 sums in another order


def test_gate_adapters_alone_change_the_recurrence_and_stay_block_diagonal(tiny):
    seq = tokens()
    model = adapted(tiny, LoraSettings(rank=2, targets=("input_gate_weight", "recurrent_gate_weight")))
    assert not torch.allclose(logits(model, seq), logits(tiny, seq), atol=1e-3)
    lru = model.layers[0].temporal_block.rg_lru
    heads, block, _ = tiny.layers[0].temporal_block.rg_lru.input_gate_weight.shape
    assert lru.input_gate_weight.shape == (heads, block, block)  # the update lives inside each head's block
    # Merged, only the gate matrices differ from the base: the adapters are in the recurrence, nowhere else.
    merged = merge_lora(model)
    for name, tensor in merged.state_dict().items():
        changed = not torch.equal(tensor, tiny.state_dict()[name])
        assert changed == name.endswith(("input_gate_weight", "recurrent_gate_weight")), name


def test_saved_adapter_loads_on_a_fresh_base(tiny, tmp_path):
    settings = LoraSettings(rank=2, alpha=4.0, dropout=0.1, targets=("linear_x", "o_proj", "down_proj",
                                                                     "recurrent_gate_weight"))
    model = adapted(tiny, settings)
    save_adapter(adapter_tensors(model), settings, tmp_path / "adapter", base_model="tiny")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    assert "layers.2.temporal_block.o_proj" in config["target_modules"]
    assert config["rgemma_gate_targets"] == [f"layers.{i}.temporal_block.rg_lru.recurrent_gate_weight"
                                             for i in (0, 1, 3, 4)]
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert stored["base_model.model.model.layers.0.temporal_block.linear_x.lora_A.weight"].shape == (2, 64)
    assert stored["base_model.model.model.layers.0.temporal_block.rg_lru.recurrent_gate_weight.lora_B.weight"].shape \
        == (2, 48, 2)

    fresh = Griffin(tiny.config)
    fresh.load_state_dict(tiny.state_dict())
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.rank == 2 and loaded.dropout == 0.1
    seq = tokens()
    torch.testing.assert_close(logits(fresh.eval(), seq), logits(model, seq), rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"linear_x.lora_B.weight has shape \(96, 2\), the model needs \(64, 2\)"):
        load_adapter(Griffin(tiny.config.replace(lru_width=64)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="targets the model lacks: layers.3.mlp_block.down_proj"):
        load_adapter(Griffin(Config.preset("tiny")), tmp_path / "adapter")  # 3 layers


def test_peft_reads_our_adapter_files(tmp_path):
    """transformers' RecurrentGemma with our adapter loaded by PEFT gives our base + adapter's logits."""
    from peft import PeftModel

    from reference import transformers_model

    config = Config.preset("tiny")  # transformers sizes its conv state by hidden_size: lru_width == width
    hf = transformers_model(config, seed=3)
    hf.save_pretrained(tmp_path / "base")
    ours = rgemma.load_model(tmp_path / "base").eval()
    settings = LoraSettings(rank=4, alpha=8.0, targets=("linear_y", "linear_out", "q_proj", "v_proj", "up_proj"))
    model = adapted(ours, settings)
    save_adapter(adapter_tensors(model), settings, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    seq = tokens(12)
    with torch.no_grad():
        theirs = peft_model(seq).logits
    assert not torch.allclose(theirs, logits(ours, seq), atol=1e-3)
    torch.testing.assert_close(logits(model, seq), theirs, rtol=0, atol=5e-5)


@pytest.fixture(scope="module")
def default_with_adapter(tmp_path_factory):
    """The embedded model in float32, an adapter for it, and the two merged."""
    directory = tmp_path_factory.mktemp("lora")
    base = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)
    settings = LoraSettings(rank=4, alpha=8.0)
    model = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)
    add_lora(model, settings)
    randomise_adapters_(model, scale=0.05)
    save_adapter(adapter_tensors(model), settings, directory / "adapter")
    return base, directory / "adapter"


def test_generation_with_an_adapter_equals_the_merged_model_on_the_cpu_fast_path(default_with_adapter, one_thread):
    from rgemma.backends.native import kernels
    from rgemma.engine import Engine, Request
    from rgemma.sampling import SamplingParams
    from rgemma.tokenizer import Tokenizer

    base, adapter = default_with_adapter
    tokenizer = Tokenizer.find(DEFAULT_MODEL)
    prompts = [tokenizer.encode(text, bos=True) for text in ("Once upon a time", "The sea was")]

    def generate(model):
        engine = Engine(model.eval(), tokenizer)
        for prompt in prompts:
            engine.add(Request(prompt, SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True))
        out = {}
        while engine.has_work:
            for event in engine.step():
                out.setdefault(event.request, []).append(event.token)
        return engine, [out[i] for i in sorted(out)]

    with_adapter = rgemma.load_model(DEFAULT_MODEL, dtype=torch.float32)
    load_adapter(with_adapter, adapter)
    engine, adapted_tokens = generate(with_adapter)
    assert engine.backend.decode_path == "plain"  # the native decoder does not know LoraLinear
    merged_engine, merged_tokens = generate(merge_lora(with_adapter))
    assert merged_engine.backend.decode_path == ("native" if kernels() is not None else "plain")
    assert merged_tokens == adapted_tokens
    _, base_tokens = generate(base)
    assert base_tokens != adapted_tokens


def test_merge_command_and_generate_and_eval_with_adapter(default_with_adapter, tmp_path, capsys):
    _, adapter = default_with_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(DEFAULT_MODEL), str(adapter), str(out)]) == 0
    assert (out / "tokenizer.model").is_file()
    merged = rgemma.load_model(out)
    expected = rgemma.load_model(DEFAULT_MODEL)  # bf16: merged in float32, rounded to bf16
    load_adapter(expected, adapter)
    for name, tensor in merge_lora(expected).state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    assert main(["merge", str(DEFAULT_MODEL), str(adapter), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err

    def generate(*extra):
        assert main(["generate", "Once upon a time", "--temperature", "0", "--max-tokens", "10", "--json",
                     "--ignore-eos", "--dtype", "float32", *extra]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    # A float32 merge, so that generation from it matches the float32 base + adapter to float precision.
    assert main(["merge", str(DEFAULT_MODEL), str(adapter), str(tmp_path / "merged32"), "--dtype", "float32"]) == 0
    from_adapter = generate("--adapter", str(adapter))
    assert from_adapter == generate("--model", str(tmp_path / "merged32"))
    assert from_adapter != generate()

    def evaluate(*extra):
        assert main(["eval", "--data", str(document), "--json", "--dtype", "float32", *extra]) == 0
        return json.loads(capsys.readouterr().out)["loss"]

    document = tmp_path / "doc.jsonl"
    document.write_text(json.dumps({"text": "Once upon a time a fox lived by the river."}) + "\n")
    with_adapter = evaluate("--adapter", str(adapter))
    assert with_adapter == pytest.approx(evaluate("--model", str(tmp_path / "merged32")), rel=1e-5)
    assert with_adapter != pytest.approx(evaluate(), rel=1e-3)


def test_adapter_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="not an adapter directory"):
        load_adapter(tiny, tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["layers.0.temporal_block.nope"]}))
    with pytest.raises(ValueError, match="targets the model lacks"):
        load_adapter(tiny, tmp_path)
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
