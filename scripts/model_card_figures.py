"""Held-out figures of a trained model for its model card.

    python scripts/model_card_figures.py --model rgemma/assets/default --corpus /work/corpus

Reads each held-out document (corpus/heldout.jsonl) in chunks, carrying the
fixed-size state, and reports the mean next-token loss (nats/token), bits per
UTF-8 byte of text, and the same for a unigram model of the training tokens
(corpus/train.tokens, add-one smoothed), the baseline the model must beat.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import rgemma
from rgemma.tokenizer import Tokenizer
from rgemma.train import TokenFile

CHUNK = 1024


@torch.no_grad()
def document_loss(model, tokens: list[int]) -> float:
    """Summed next-token loss (nats) of one document, read chunk by chunk through the state."""
    ids = torch.tensor(tokens)[None]
    state, total = None, 0.0
    for start in range(0, len(tokens) - 1, CHUNK):
        chunk = ids[:, start : start + CHUNK + 1]
        logits, state = model(chunk[:, :-1], state=state)
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True, help="directory of prepare-data's output")
    args = parser.parse_args()

    model = rgemma.load_model(args.model, dtype=torch.float32).eval()
    tokenizer = Tokenizer.find(args.model)
    counts = np.bincount(np.asarray(TokenFile.open(f"{args.corpus}/train.tokens").tokens),
                         minlength=tokenizer.vocab_size).astype(np.float64) + 1.0
    unigram = -np.log(counts / counts.sum())

    with open(f"{args.corpus}/heldout.jsonl", encoding="utf-8") as lines:
        documents = [json.loads(line)["text"] for line in lines]
    model_nats = unigram_nats = 0.0
    predicted = text_bytes = 0
    for text in tqdm(documents, desc="held-out documents"):
        tokens = [tokenizer.bos_id] + tokenizer.encode(text)
        model_nats += document_loss(model, tokens)
        unigram_nats += float(unigram[tokens[1:]].sum())
        predicted += len(tokens) - 1
        text_bytes += len(text.encode("utf-8"))
    figures = {
        "heldout_documents": len(documents),
        "heldout_tokens": predicted,
        "heldout_bytes": text_bytes,
        "loss_nats_per_token": model_nats / predicted,
        "bits_per_byte": model_nats / math.log(2) / text_bytes,
        "unigram_loss_nats_per_token": unigram_nats / predicted,
        "unigram_bits_per_byte": unigram_nats / math.log(2) / text_bytes,
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
