"""How much int8 and int4 weights change a model's predictions: on real text, and along a long generation.

    python scripts/quantization_quality.py [--model rgemma/assets/default] [--corpus /work/corpus/heldout.jsonl]

Against the unquantized model (in its stored dtype, bf16 for the embedded
model), for bits 8 and 4 (`load_model(path, quantize=bits)`):

1. Real text: the first --tokens tokens of the held-out documents (each cut
   at --doc-tokens), read in chunks through the state as a prompt is (the
   plain dequantize-and-GEMM path). Held-out loss in nats per token and bits
   per UTF-8 byte, top-1 agreement of the next-token predictions with the
   reference, and mean KL(reference || quantized) of the next-token
   distributions.
2. Generation: the reference samples a --continuation-token continuation
   of a held-out prompt, one token at a time; each quantized model is fed
   the same tokens through its state, --feed at a time (at most the rows the
   native decode kernels take, so the products take the decode path), and
   the same agreement and KL are reported per window of --window tokens. An
   error that compounded along the sequence, through the recurrence, would
   show as growth from window to window.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import rgemma
from rgemma.backends import prepare
from rgemma.backends.cpu import MAX_KERNEL_ROWS
from rgemma.hub import DEFAULT_MODEL
from rgemma.tokenizer import Tokenizer

BITS = (8, 4)
CHUNK = 1024


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def held_out_documents(corpus: Path, tokenizer: Tokenizer, budget: int, doc_tokens: int) -> list[list[int]]:
    """Token ids (bos first) of the first documents, each at most doc_tokens + 1 long, budget predictions in all."""
    documents, predicted = [], 0
    with open(corpus, encoding="utf-8") as lines:
        for line in lines:
            ids = tokenizer.encode(json.loads(line)["text"], bos=True)[: min(doc_tokens, budget - predicted) + 1]
            documents.append(ids)
            predicted += len(ids) - 1
            if predicted >= budget:
                break
    return documents


@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) float32 log-probabilities of each next token, read in chunks through the state."""
    tokens = torch.tensor(ids)[None]
    state, out = None, []
    for start in range(0, len(ids) - 1, CHUNK):
        logits, state = model(tokens[:, start : min(start + CHUNK, len(ids) - 1)], state=state)
        out.append(torch.log_softmax(logits[0].float(), dim=-1))
    return torch.cat(out)


def kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of log-probabilities, in nats."""
    return (reference.exp() * (reference - other)).sum(-1)


def real_text(models: dict, tokenizer: Tokenizer, documents: list[list[int]]) -> dict:
    sums = {name: {"nats": 0.0, "agree": 0, "kl": 0.0} for name in models}
    predicted = text_bytes = 0
    for ids in documents:
        targets = torch.tensor(ids[1:])
        reference = None
        for name, model in models.items():
            logprobs = next_token_logprobs(model, ids)
            if reference is None:
                reference = logprobs
            sums[name]["nats"] += -logprobs.gather(1, targets[:, None]).sum().item()
            sums[name]["agree"] += (logprobs.argmax(-1) == reference.argmax(-1)).sum().item()
            sums[name]["kl"] += kl(reference, logprobs).sum().item()
        predicted += len(targets)
        text_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
    return {
        "documents": len(documents), "tokens": predicted, "bytes": text_bytes,
        "models": {
            name: {
                "loss_nats_per_token": s["nats"] / predicted,
                "bits_per_byte": s["nats"] / math.log(2) / text_bytes,
                "top1_agreement": s["agree"] / predicted,
                "mean_kl_nats": s["kl"] / predicted,
            }
            for name, s in sums.items()
        },
    }


@torch.no_grad()
def continuation(model, prompt: list[int], length: int, temperature: float, seed: int):
    """Sample `length` tokens one at a time; returns them and the (length, V) log-probabilities they came from."""
    generator = torch.Generator().manual_seed(seed)
    last, state = model.prefill(torch.tensor(prompt)[None])
    tokens, logprobs = [], []
    for _ in range(length):
        logits = last[0].float()
        logprobs.append(torch.log_softmax(logits, -1))
        token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        tokens.append(token.item())
        step, state = model(token[None], state=state)
        last = step[:, -1]
    return tokens, torch.stack(logprobs)


@torch.no_grad()
def teacher_forced(model, prompt: list[int], tokens: list[int], chunk: int) -> torch.Tensor:
    """(len(tokens), V) log-probabilities of each token given the prompt and the tokens before it.

    The tokens are fed a few at a time (at most the rows the native decode
    kernels take), through the state, so the products take the decode path.
    """
    last, state = model.prefill(torch.tensor(prompt)[None])
    out = [torch.log_softmax(last.float(), -1)]
    fed = torch.tensor(tokens[:-1])[None]
    for start in range(0, fed.shape[1], chunk):
        logits, state = model(fed[:, start : start + chunk], state=state)
        out.append(torch.log_softmax(logits[0].float(), -1))
    return torch.cat(out)


def generation(models: dict, prompt: list[int], length: int, window: int, temperature: float, seed: int,
               chunk: int) -> dict:
    """The first (reference) model samples a continuation; the others predict the same tokens."""
    (reference_name, reference), *others = models.items()
    tokens, expected = continuation(reference, prompt, length, temperature, seed)
    windows = [{"tokens": [start, min(start + window, length)]} for start in range(0, length, window)]
    for name, model in others:
        logprobs = teacher_forced(model, prompt, tokens, chunk)
        agree = logprobs.argmax(-1) == expected.argmax(-1)
        divergence = kl(expected, logprobs)
        for row in windows:
            span = slice(*row["tokens"])
            row[name] = {"top1_agreement": agree[span].float().mean().item(),
                         "mean_kl_nats": divergence[span].mean().item()}
    return {"prompt_tokens": len(prompt), "generated_tokens": length, "temperature": temperature, "seed": seed,
            "fed_per_step": chunk, "tokens": tokens, "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a float checkpoint (default: the embedded model)")
    parser.add_argument("--corpus", default="/work/corpus/heldout.jsonl", help="JSON lines with a 'text' field")
    parser.add_argument("--tokens", type=int, default=4096, help="real-text tokens to predict")
    parser.add_argument("--doc-tokens", type=int, default=2048, help="at most this many from each document")
    parser.add_argument("--continuation", type=int, default=4096, help="tokens to generate")
    parser.add_argument("--window", type=int, default=512, help="report the generation in windows of this many")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt: this many tokens of a held-out text")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--feed", type=int, default=MAX_KERNEL_ROWS,
                        help="quantized models read the continuation this many tokens at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer = Tokenizer.find(args.model)
    reference = rgemma.load_model(args.model).eval()
    prepare(reference)
    reference_name = str(reference.dtype).removeprefix("torch.")
    models = {reference_name: reference}
    for bits in BITS:
        models[f"int{bits}"] = rgemma.load_model(args.model, quantize=bits, group_size=args.group_size).eval()
        prepare(models[f"int{bits}"])

    documents = held_out_documents(Path(args.corpus), tokenizer, args.tokens, args.doc_tokens)
    text = real_text(models, tokenizer, documents)
    prompt = held_out_documents(Path(args.corpus), tokenizer, args.prompt_tokens, args.prompt_tokens)[0]
    generated = generation(models, prompt, args.continuation, args.window, args.temperature, args.seed, args.feed)
    figures = {
        "model": args.model, "group_size": args.group_size, "threads": args.threads,
        "weight_bytes": {name: weight_bytes(model) for name, model in models.items()},
        "real_text": text, "generation": {k: v for k, v in generated.items() if k != "tokens"},
        "seconds": time.time() - started,
    }

    print(f"model {args.model}; real text: {text['tokens']:,} tokens ({text['bytes']:,} bytes) "
          f"of {text['documents']} held-out documents")
    print(f"{'weights':<10}{'bytes':>12}{'nats/token':>12}{'bits/byte':>11}{'top-1 agree':>13}{'KL (nats)':>11}")
    for name, row in text["models"].items():
        print(f"{name:<10}{figures['weight_bytes'][name]:>12,}{row['loss_nats_per_token']:>12.4f}"
              f"{row['bits_per_byte']:>11.4f}{row['top1_agreement']:>13.2%}{row['mean_kl_nats']:>11.5f}")
    others = [name for name in models if name != reference_name]
    print(f"\ngeneration: {args.continuation} tokens sampled by {reference_name} (temperature {args.temperature}) "
          f"after a {len(prompt)}-token prompt; the quantized models read them {args.feed} at a time")
    print(f"{'tokens':<13}" + "".join(f"{name + ' agree':>13}{name + ' KL':>11}" for name in others))
    for window in generated["windows"]:
        start, stop = window["tokens"]
        print(f"{f'{start}-{stop - 1}':<13}" + "".join(
            f"{window[name]['top1_agreement']:>13.2%}{window[name]['mean_kl_nats']:>11.5f}" for name in others))
    print(f"\n{figures['seconds']:.0f} s on {args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
