"""Weight-only quantization: error bounds, the plain and native paths, files and their metadata, the CLI,
and the parts that must stay float.

Every parameter of the models is random (norms and biases included), so
equal logits mean every tensor landed in the right place.
"""

import gc
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rgemma
from rgemma import cli
from rgemma.backends import prepare
from rgemma.backends.cpu import NATIVE_KINDS
from rgemma.backends.native import kernels
from rgemma.checkpoint import CheckpointError, load_model, save_model
from rgemma.config import griffin_pattern
from rgemma.hub import DEFAULT_MODEL
from rgemma.model import Conv1D, RGLRU, RMSNorm
from rgemma.quantize import (
    Int4Linear, Int8Linear, Quantization, QuantizedLinear, pack_int4, quantize_model, quantize_weight, unpack_int4,
)
from conftest import perturb_

pytestmark = pytest.mark.usefixtures("one_thread")

# Widths that are multiples of 64 (tiny), and widths that are not: 96 and 160
# are multiples of 32 only, 80 not even that (int8 takes the plain path there).
CONFIGS = {
    "tiny": rgemma.Config.preset("tiny"),
    "odd": rgemma.Config(vocab_size=512, width=96, mlp_width=160, num_heads=2, lru_width=80,
                         block_types=griffin_pattern(3), attention_window=8),
}
FORMATS = [(8, None), (4, 64), (4, 128)]


def random_model(config, seed=0):
    torch.manual_seed(seed)
    return perturb_(rgemma.Griffin(config), seed=seed).eval()


def tokens(batch=2, length=20, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def quantize(model, bits, group_size):
    return quantize_model(model, bits, group_size or 64)


@torch.no_grad()
def logits(model, seq):
    return model(seq)[0]


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """Each config's random model, saved as a float Hugging Face directory."""
    root = tmp_path_factory.mktemp("float")
    return {name: save_model(random_model(config), root / name) for name, config in CONFIGS.items()}


# Formats -------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(9, 100, generator=torch.Generator().manual_seed(0)) * 0.05
    w[1] = 0.0  # scale 0
    w[2] = 0.3  # a constant row
    w[3, 7] = -5.0  # an outlier sets its row's scale
    stored = quantize_weight(w, 8)
    q, scale = stored["qweight"], stored["scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert q.abs().max() == 127 and q.min() >= -127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert error[1].max() == 0 and q[3, 7] == -127


@pytest.mark.parametrize("in_features, group", [(192, 64), (100, 64), (256, 128), (40, 64)])
def test_int4_error_is_at_most_half_a_step_per_group(in_features, group):
    generator = torch.Generator().manual_seed(in_features)
    w = torch.randn(7, in_features, generator=generator) * 0.05
    w[1] = 0.0
    w[2] = -0.75  # constant groups: exact, as -0.75 is a float16
    w[5] = -0.7  # not a float16: within the bound
    # Far from zero with a small range: float16 rounds such a minimum by more
    # than a step, unless it is rounded outward as the quantizer does.
    w[3] = 1000.3 + 0.05 * torch.rand(in_features, generator=generator)
    w[4, 0] = 3.0  # an outlier widens one group only
    stored = quantize_weight(w, 4, group)
    padded = -(-in_features // group) * group
    assert stored["qweight"].shape == (7, padded // 2) and stored["qweight"].dtype == torch.uint8
    assert stored["scale"].shape == stored["minimum"].shape == (7, padded // group)
    assert stored["scale"].dtype == stored["minimum"].dtype == torch.float16
    module = Int4Linear(in_features, 7, bias=False, group_size=group)
    for part, tensor in stored.items():
        setattr(module, part, tensor)
    error = (module.dequantize(slice(None), torch.float32) - w).abs()  # (7, K)
    step = stored["scale"].float().repeat_interleave(group, dim=1)[:, :in_features]
    assert (error <= step / 2 * (1 + 1e-3) + 1e-6).all()
    assert error[1].max() == 0 and error[2].max() == 0


def test_nibble_packing_round_trip_and_layout():
    q = torch.randint(0, 16, (5, 192), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 96)
    assert torch.equal(unpack_int4(packed), q)
    # Byte i of each 32-byte block: input i in the low nibble, input i + 32 in the high one.
    for block in range(3):
        for i in (0, 17, 31):
            byte = packed[2, block * 32 + i]
            assert byte & 15 == q[2, block * 64 + i] and byte >> 4 == q[2, block * 64 + 32 + i]


def test_bad_formats_and_unstorable_weights():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weight(torch.zeros(2, 64), 3)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_weight(torch.zeros(2, 64), 4, 96)
    model = random_model(CONFIGS["tiny"])
    with torch.no_grad():
        model.layers[1].mlp_block.up_proj.weight[0, 0] = -1e5  # beyond float16: no int4 minimum holds it
    with pytest.raises(ValueError, match=r"layers\.1\.mlp_block\.up_proj cannot be stored in 4 bits"):
        quantize_model(model, 4)
    quantize_model(model, 8)  # int8's float32 scales can
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 8)


# The two paths ---------------------------------------------------------------------


def quantized_linear(bits, in_features, group=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(13, in_features, generator=generator) * 0.1
    module = (Int8Linear(in_features, 13) if bits == 8 else Int4Linear(in_features, 13, group_size=group))
    for part, tensor in quantize_weight(weight, bits, group).items():
        setattr(module, part, tensor)
    module.bias = torch.nn.Parameter(torch.randn(13, generator=generator), requires_grad=False)
    return module


@pytest.mark.skipif(kernels() is None, reason="the native CPU kernels cannot be built here")
@pytest.mark.parametrize("bits, in_features, group", [(8, 96, None), (4, 128, 64), (4, 100, 64), (4, 256, 128)])
@torch.no_grad()
def test_native_path_equals_plain_path_within_activation_quantization(bits, in_features, group):
    module = quantized_linear(bits, in_features, group or 64)
    native_module = quantized_linear(bits, in_features, group or 64)
    native_module.__class__ = NATIVE_KINDS[type(module)]  # what the CPU backend makes of it
    w = module.dequantize(slice(None), torch.float64)  # (N, K)
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        native = native_module(x)
        plain = module(x)
        expected = x.double() @ w.T + module.bias.double()
        torch.testing.assert_close(plain.double(), expected, rtol=0, atol=1e-5)
        # Each input moves by at most half its block's step, max|x_block| / 254.
        block = 32 if bits == 8 else 64
        padded = torch.nn.functional.pad(x, (0, -in_features % block)).double()
        step = padded.unflatten(1, (-1, block)).abs().amax(-1).repeat_interleave(block, 1)[:, :in_features] / 254
        bound = step @ w.abs().T  # (rows, N)
        assert ((native.double() - plain.double()).abs() <= bound * 1.001 + 1e-5).all()
        assert (native - plain).abs().max() > 1e-6  # the native path really ran
    bf16 = native_module(torch.randn(1, 3, in_features).bfloat16())
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, 3, 13)


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_blocks_of_rows_change_nothing(monkeypatch, bits):
    """Quantizing and the plain path work a block of rows at a time: the result is the same."""
    import rgemma.quantize

    weight = torch.randn(50, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 20, 128, generator=torch.Generator().manual_seed(1))  # 60 rows: the plain path
    module = quantized_linear(bits, 128)
    whole, whole_y = quantize_weight(weight, bits), module(x)
    monkeypatch.setattr(rgemma.quantize, "CHUNK_WEIGHTS", 7 * 128)  # blocks of 7 rows
    for part, tensor in quantize_weight(weight, bits).items():
        assert torch.equal(tensor, whole[part]), part
    torch.testing.assert_close(module(x), whole_y, rtol=0, atol=1e-5)  # GEMMs of other shapes sum in other orders


# Models ------------------------------------------------------------------------------


def test_the_recurrence_convolution_and_norms_stay_float():
    model = quantize_model(random_model(CONFIGS["tiny"]), 4)
    record = Quantization.of(model)
    expected = ["embed_tokens"] + [
        f"layers.{i}.{name}"
        for i, kind in enumerate(model.config.block_types)
        for name in (
            ["temporal_block.linear_y", "temporal_block.linear_x", "temporal_block.linear_out"]
            if kind == "recurrent" else
            ["temporal_block.q_proj", "temporal_block.k_proj", "temporal_block.v_proj", "temporal_block.o_proj"]
        ) + ["mlp_block.gate_proj", "mlp_block.up_proj", "mlp_block.down_proj"]
    ]
    assert sorted(record.modules) == sorted(expected) and (record.bits, record.group_size) == (4, 64)
    kept = [m for m in model.modules() if isinstance(m, (RGLRU, Conv1D, RMSNorm))]
    # Two norms per layer, the final norm, an RG-LRU and a conv per recurrent layer.
    assert len(kept) == 3 * 2 + 1 + 2 * 2
    for module in kept:
        for name, param in module.named_parameters():
            assert param.dtype == torch.float32, name
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert [n for n, _ in module.named_parameters()] == (["bias"] if module.bias is not None else []), name
            assert module.qweight.dtype == torch.uint8, name
    # Everything else is as it was.
    assert {n for n, p in model.named_parameters()} == {
        n for n, p in random_model(CONFIGS["tiny"]).named_parameters()
        if not (n.endswith(".weight") and n.removesuffix(".weight") in record.modules)
    }


def test_dtype_changes_only_the_float_parts():
    model = quantize_model(random_model(CONFIGS["tiny"]), 4).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    layer = model.layers[0]
    gate = layer.mlp_block.gate_proj
    assert gate.scale.dtype == gate.minimum.dtype == torch.float16 and gate.bias.dtype == torch.bfloat16
    assert layer.temporal_block.rg_lru.recurrent_param.dtype == torch.bfloat16
    assert model.embed_tokens(tokens(1, 3)).dtype == torch.bfloat16
    int8 = quantize_model(random_model(CONFIGS["tiny"]), 8).half()
    assert int8.layers[0].mlp_block.up_proj.scale.dtype == torch.float32 and int8.dtype == torch.float16


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bits, group", FORMATS)
def test_file_round_trip_is_exact(float_dirs, tmp_path, config, bits, group):
    model = quantize(random_model(CONFIGS[config]), bits, group)
    out = save_model(model, tmp_path / "quantized")
    record = json.loads((out / "config.json").read_text())["quantization"]
    modules = ["model." + m for m in Quantization.of(model).modules]
    assert record == {"bits": bits, "group_size": group, "modules": modules}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["quantization"]) == record
    loaded = load_model(out)
    assert isinstance(loaded.layers[0].mlp_block.up_proj, Int8Linear if bits == 8 else Int4Linear)
    saved, reread = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reread.keys()
    for name in saved:
        assert saved[name].dtype == reread[name].dtype and torch.equal(saved[name], reread[name]), name
    seq = tokens(length=20)  # the plain path
    assert torch.equal(logits(loaded, seq), logits(model, seq))
    assert torch.equal(logits(loaded, seq[:, :1]), logits(model, seq[:, :1]))  # the native path

    # Quantizing while loading gives the same model as quantizing after loading.
    while_loading = load_model(float_dirs[config], quantize=bits, **({"group_size": group} if group else {}))
    after = quantize(load_model(float_dirs[config]), bits, group)
    for name, tensor in after.state_dict().items():
        assert torch.equal(tensor, while_loading.state_dict()[name]), name


def test_sharded_round_trip_and_kept_dtype(float_dirs, tmp_path):
    model = load_model(float_dirs["odd"], dtype=torch.bfloat16, quantize=4)
    assert model.dtype == torch.bfloat16 and model.layers[0].temporal_block.conv_1d.weight.dtype == torch.bfloat16
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    record = json.loads((out / "config.json").read_text())["quantization"]
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            assert json.loads(f.metadata()["quantization"]) == record
    loaded = load_model(out)
    assert loaded.dtype == torch.bfloat16
    seq = tokens(length=18)
    assert torch.equal(logits(loaded, seq), logits(model, seq))


def mapped_files() -> set[str]:
    """Paths of the files mapped into this process (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("quantize", [None, 8])
def test_quantizing_at_load_keeps_no_view_of_the_float_file(float_dirs, quantize):
    """Quantizing reads every float weight: a view kept of the file would keep all its pages resident."""
    files = {str(f) for f in float_dirs["tiny"].glob("*.safetensors")}
    model = load_model(float_dirs["tiny"], quantize=quantize)
    gc.collect()
    still_mapped = files & mapped_files()
    if quantize is None:  # float weights stay views of the file (no copy at load)
        assert still_mapped == files
    else:
        assert not still_mapped
    del model
    gc.collect()


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(address: int) -> str:
    """This process's /proc/self/smaps entry for the mapping that holds `address`."""
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(a, 16) for a in entry.split()[0].split("-"))
        if start <= address < end:
            return entry
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(), reason="no transparent huge pages here"
)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_ask_for_huge_pages(bits):
    """Decoding streams the quantized weights every step: they ask for 2 MB pages, which cut the TLB misses."""
    stored = quantize_weight(torch.randn(4096, 8192), bits)  # qweight 32 or 16 MB; the rest is too small to check
    huge = 2 * 2**20
    for name, tensor in stored.items():
        if tensor.nbytes >= 2 * huge:
            first_whole_page = -(-tensor.data_ptr() // huge) * huge
            assert re.search(r"^THPeligible:\s+1$", mapping_of(first_whole_page), re.MULTILINE), name


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_decode_equals_full_forward(bits):
    model = quantize_model(random_model(CONFIGS["odd"]), bits)
    seq = tokens(2, 24)  # three windows (8)

    def decoded():
        state, steps = None, []
        for t in range(seq.shape[1]):
            step, state = model(seq[:, t : t + 1], state=state)
            steps.append(step)
        return torch.cat(steps, dim=1)

    full = logits(model, seq)
    torch.testing.assert_close(decoded(), full, rtol=0, atol=2e-5)  # the plain path: only the summation order differs
    if kernels() is None:
        return
    prepare(model)
    # The native kernels quantize the activations too (see the test above for
    # the exact bound per product); over the whole network that is a few
    # percent of the logits' spread, and it does not compound over the steps.
    error = (decoded() - full).abs()
    assert error.mean() < 0.06 * full.std() and error.max() < 0.15 * full.abs().max()
    assert error[:, 12:].mean() < 2 * error[:, :12].mean()


# Bad checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    return save_model(quantize_model(random_model(CONFIGS["tiny"]), 4), tmp_path_factory.mktemp("int4") / "model")


def edited_copy(source, tmp_path, edit_config=None, edit_tensors=None, edit_header=None, edit_record=None):
    """A copy of a directory with its config.json, tensors, header metadata or quantization record
    (in config.json and header alike) changed in place by the given functions."""
    out = tmp_path / "edited"
    shutil.copytree(source, out)
    if edit_record:
        def edit_config(hf, edit_config=edit_config):
            hf["quantization"] = edit_record(hf["quantization"])
            (edit_config or (lambda _: None))(hf)

        def edit_header(header, edit_header=edit_header):
            header["quantization"] = json.dumps(edit_record(json.loads(header["quantization"])))
            (edit_header or (lambda _: None))(header)
    if edit_config:
        hf = json.loads((out / "config.json").read_text())
        edit_config(hf)
        (out / "config.json").write_text(json.dumps(hf))
    if edit_tensors or edit_header:
        with safe_open(out / "model.safetensors", framework="pt") as f:
            header = f.metadata()
        tensors = {name: t.clone() for name, t in load_file(out / "model.safetensors").items()}
        (edit_tensors or (lambda t: None))(tensors)
        (edit_header or (lambda h: None))(header)
        save_file(tensors, out / "model.safetensors", metadata=header)
    return out


def set_field(field, value):
    return lambda record: record | {field: value}


LAYER0 = "model.layers.0"
UP = f"{LAYER0}.mlp_block.up_proj"


@pytest.mark.parametrize(
    "edits, expected",
    [
        ({"edit_record": set_field("bits", 5)}, "config.json: quantization.bits must be 8 or 4, got 5"),
        ({"edit_record": set_field("group_size", 96)}, "quantization.group_size must be a positive multiple of 64"),
        ({"edit_record": set_field("zero_point", True)}, "quantization has unknown fields ['zero_point']"),
        ({"edit_record": set_field("modules", [])}, "quantization.modules must be a non-empty list"),
        ({"edit_record": lambda record: [4]}, "quantization must be an object"),
        ({"edit_record": lambda record: record | {"modules": [*record["modules"], f"{LAYER0}.temporal_block.rg_lru"]}},
         "names layers.0.temporal_block.rg_lru, which is not a quantizable module"),
        ({"edit_record": lambda record: record | {"modules": record["modules"][1:]}},  # the embedding said to be float
         "missing tensor model.embed_tokens.weight"),
        # config.json and the header must agree.
        ({"edit_header": lambda h: h.update(quantization=h["quantization"].replace('"bits": 4', '"bits": 8'))},
         "model.safetensors: header quantization differs from the one in config.json"),
        ({"edit_header": lambda h: h.pop("quantization")}, "model.safetensors: header lacks the quantization"),
        ({"edit_header": lambda h: h.update(quantization="{not json")}, "header field quantization is not JSON"),
        ({"edit_config": lambda hf: hf.pop("quantization")}, "header records a quantization that config.json lacks"),
        # The tensors must be those the record describes.
        ({"edit_tensors": lambda t: t.update({f"{UP}.qweight": t[f"{UP}.qweight"].to(torch.int16)})},
         f"dtype mismatch for {UP}.qweight (in model.safetensors): file has torch.int16"),
        ({"edit_tensors": lambda t: t.update({f"{UP}.scale": t[f"{UP}.scale"][:-1].contiguous()})},
         f"shape mismatch for {UP}.scale"),
        ({"edit_tensors": lambda t: t.pop(f"{UP}.minimum")}, f"missing tensor {UP}.minimum"),
        ({"edit_tensors": lambda t: t.update({"lm_head.weight": torch.zeros(512, 64)})},
         "unexpected tensor lm_head.weight"),
    ],
    ids=["bits", "group", "unknown-field", "no-modules", "not-object", "rg-lru", "unlisted", "header-differs",
         "header-lacks", "header-not-json", "config-lacks", "qweight-dtype", "scale-shape", "missing-minimum",
         "lm-head"],
)
def test_bad_quantized_checkpoint(int4_dir, tmp_path, edits, expected):
    edited = edited_copy(int4_dir, tmp_path, **edits)
    with pytest.raises(CheckpointError, match=re.escape(str(edited))) as error:
        load_model(edited)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_quantizing_a_quantized_checkpoint_is_refused(int4_dir):
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(int4_dir, quantize=8)


# The command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random float model with the embedded default's tokenizer (8192 pieces)."""
    out = save_model(random_model(CONFIGS["tiny"].replace(vocab_size=8192)), tmp_path_factory.mktemp("m") / "tiny")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", out / "tokenizer.model")
    return out


def run(*args):
    return subprocess.run([sys.executable, "-m", "rgemma.cli", *map(str, args)], capture_output=True, text=True)


def test_quantize_then_generate(model_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    assert cli.main(["quantize", str(model_dir), str(out), "--bits", "4", "--group-size", "128"]) == 0
    assert capsys.readouterr().err.strip().endswith(f"wrote {out}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 128
    args = ["--json", "--threads", "1", "Once upon a time", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]
    from_file = run("generate", "--model", out, *args)
    assert from_file.returncode == 0, from_file.stderr
    assert cli.main(["generate", "--model", str(model_dir), "--quantize", "4", "--group-size", "128", *args]) == 0
    while_loading = json.loads(capsys.readouterr().out)
    assert json.loads(from_file.stdout)["tokens"] == while_loading["tokens"] and len(while_loading["tokens"]) == 6


def test_info_tells_the_quantization_and_bytes(model_dir, tmp_path, capsys):
    assert cli.main(["info", str(model_dir), "--quantize", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"]["bits"] == 8 and info["quantization"]["group_size"] is None
    float_model = random_model(CONFIGS["tiny"].replace(vocab_size=8192))
    assert info["parameters"] == sum(p.numel() for p in float_model.parameters())
    model = load_model(model_dir, quantize=8)
    assert info["weight_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    out = save_model(model, tmp_path / "int8")
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int8 with a scale per row" in text and f"{info['weight_bytes']:,} bytes" in text


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--bits", "3"], "bits must be 8 or 4, got 3"),
        (["--bits", "4", "--group-size", "96"], "group size must be a positive multiple of 64, got 96"),
        (["--bits", "8", "--group-size", "128"], "--group-size applies to --bits 4 only"),
    ],
)
def test_quantize_rejects_bad_options(model_dir, tmp_path, capsys, args, expected):
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), *args]) == 1
    error = capsys.readouterr().err
    assert error.startswith("rgemma: error: ") and expected in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_bad_sources_and_targets(model_dir, int4_dir, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    corrupt = edited_copy(int4_dir, tmp_path, edit_record=set_field("bits", 5))
    cases = [
        (["quantize", str(model_dir), str(existing), "--bits", "8"], "not an empty directory"),
        (["quantize", str(int4_dir), str(tmp_path / "again"), "--bits", "8"], "already quantized"),
        (["quantize", str(corrupt), str(tmp_path / "out"), "--bits", "4"], "quantization.bits must be 8 or 4"),
        (["info", str(corrupt)], "quantization.bits must be 8 or 4"),
        (["generate", "--model", str(model_dir), "--quantize", "4", "--group-size", "32", "Hi"], "multiple of 64"),
    ]
    for args, expected in cases:
        assert cli.main(args) == 1, args
        error = capsys.readouterr().err
        assert error.startswith("rgemma: error: ") and expected in error and len(error.strip().splitlines()) == 1
    assert (existing / "notes.txt").read_text() == "keep me" and len(list(existing.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "existing"]
