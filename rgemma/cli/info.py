"""`rgemma info`: config, parameter count, dtype and state size of a model."""

from __future__ import annotations

import argparse
import json
import os

from rgemma.cli.options import DTYPES, add_quantize_options, quantize_options, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?",
                        help="preset name (2b, 9b, griffin-7b, hawk-7b, tiny), checkpoint path or hub id "
                             "(default: the model embedded in rgemma)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to report (presets) or load in")
    add_quantize_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hardware", action="store_true",
                        help="instead: the CPU flags the native kernels choose from, and the level chosen")


def _load(args):
    """A preset name gives an uninitialised model on the meta device; anything else is a checkpoint path."""
    import torch

    from rgemma.config import PRESETS, Config
    from rgemma.model import Griffin
    from rgemma.quantize import quantize_model

    quantize = quantize_options(args)
    if args.model in PRESETS:
        model = Griffin(Config.preset(args.model), dtype=torch_dtype(args.dtype) or torch.bfloat16, device="meta")
        if quantize:  # on the meta device: the quantized modules, empty, to count their bytes
            quantize_model(model, quantize["quantize"], **({"group_size": args.group_size} if args.group_size else {}))
        return model
    from rgemma.checkpoint import load_model
    from rgemma.hub import resolve_model

    return load_model(resolve_model(args.model), dtype=torch_dtype(args.dtype), **quantize)


def _hardware() -> dict:
    """What the native kernels' dispatch sees on this machine (rgemma/backends/native.py)."""
    import torch

    from rgemma.backends import native

    wanted = dict.fromkeys(flag for level in native.LEVELS.values() for flag in level.cpu_flags)
    return {
        "cpu_flags": {flag: flag in native.cpu_flags() for flag in wanted},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "levels": {name: {"runs": not native.missing_flags(name), "missing": native.missing_flags(name),
                          "built": native.is_built(name)} for name in native.LEVELS},
        "chosen_level": native.chosen_level(),
        "forced_by": native.LEVEL_VARIABLE if os.environ.get(native.LEVEL_VARIABLE) else None,
    }


def _print_hardware(hardware: dict) -> None:
    seen = [flag for flag, present in hardware["cpu_flags"].items() if present]
    absent = [flag for flag, present in hardware["cpu_flags"].items() if not present]
    print("cpu flags    " + (" ".join(seen) or "none of the kernels' flags")
          + (f" (absent: {' '.join(absent)})" if absent else ""))
    print(f"torch        cpu capability {hardware['torch_cpu_capability']}")
    for name, level in hardware["levels"].items():
        state = ("runs here, " + ("built" if level["built"] else "not built yet") if level["runs"]
                 else "lacks " + ", ".join(level["missing"]))
        print(f"level        {name}: {state}")
    chosen = hardware["chosen_level"] or "none (plain PyTorch)"
    print(f"chosen       {chosen}" + (f" (forced by {hardware['forced_by']})" if hardware["forced_by"] else
                                      " (the best this CPU runs; RGEMMA_CPU_LEVEL forces another)"))


def run(args: argparse.Namespace) -> None:
    if args.hardware:
        hardware = _hardware()
        print(json.dumps(hardware, indent=2)) if args.json else _print_hardware(hardware)
        return
    from rgemma.backends import prepare
    from rgemma.quantize import Quantization, parameter_count
    from rgemma.state import State

    model = _load(args)
    # How this machine would serve it; a preset has no weights to serve.
    backend = None if model.device.type == "meta" else prepare(model).describe()
    config = model.config
    parameters = parameter_count(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantization = Quantization.of(model)
    state = State.zeros(config, 1, dtype=model.dtype, device="meta")
    info = {
        "source": args.model or "embedded default",
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "quantization": None if quantization is None else quantization.to_json(),
        "state_bytes_per_sequence": state.nbytes,
        "backend": backend,
        "config": {**{k: getattr(config, k) for k in config.__dataclass_fields__}, "block_types": list(config.block_types)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    pattern = "".join("R" if b == "recurrent" else "A" for b in config.block_types)
    print(f"model        {info['source']}")
    if quantization is None:
        print(f"parameters   {parameters:,} ({weight_bytes / 2**30:.2f} GiB in {info['dtype']})")
    else:
        scales = ("a scale per row" if quantization.bits == 8
                  else f"a scale and minimum per {quantization.group_size} inputs")
        print(f"parameters   {parameters:,} ({weight_bytes:,} bytes = {weight_bytes / 2**30:.2f} GiB)")
        print(f"quantization int{quantization.bits} with {scales}, in {len(quantization.modules)} modules "
              f"(embedding and linears); the RG-LRU, convolution, norms and biases in {info['dtype']}")
    print(f"state        {state.nbytes:,} bytes per sequence, whatever its length")
    if backend is not None:
        print(f"backend      {backend['backend']} on {backend['device']}: activations in {backend['activations']}, "
              f"decode steps {backend['decode']}"
              + (f", kernels {backend['cpu_level']}" if "cpu_level" in backend else ""))
    print(f"layers       {config.num_layers}: {pattern} (R recurrent, A local attention)")
    print(f"width        {config.width}, lru {config.lru_width}, mlp {config.mlp_width} x2, "
          f"heads {config.num_heads} x {config.head_dim} (1 kv head)")
    print(f"window       {config.attention_window} earlier tokens + itself")
    print(f"vocabulary   {config.vocab_size}, logits soft-cap {config.logits_soft_cap or 'none'}, "
          f"embedding scale {config.embedding_scale}")
