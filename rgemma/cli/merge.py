"""`rgemma merge`: fold a LoRA adapter into its base model and write the result in the Hugging Face layout."""

from __future__ import annotations

import argparse
import shutil
import sys

from rgemma.cli.options import DTYPES, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="the base checkpoint (directory, file or hub id) the adapter was trained on")
    parser.add_argument("adapter", help="the adapter directory (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("out", help="the directory to write; must not exist or be empty")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the merged weights (default: the base's)")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rgemma._io import atomic_directory
    from rgemma.checkpoint import TOKENIZER_FILES, load_model, save_model
    from rgemma.hub import resolve_model
    from rgemma.lora import load_adapter, merge_lora

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty directory; will not overwrite it")
    base = resolve_model(args.base)
    model = load_model(base, dtype=torch_dtype(args.dtype))
    load_adapter(model, args.adapter)
    merge_lora(model)
    tokenizer_dir = base if base.is_dir() else base.parent
    with atomic_directory(out, replace=True) as staging:  # replaces only the empty directory checked above
        save_model(model, staging)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, staging / name)
    print(f"merged {args.adapter} into {base}; wrote {out}", file=sys.stderr)
