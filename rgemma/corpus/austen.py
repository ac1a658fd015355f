"""Jane Austen's six novels from the Debian package r-cran-janeaustenr, one document per chapter."""

from __future__ import annotations

import re
from pathlib import Path

from rgemma.corpus.debian import deb_files
from rgemma.corpus.document import CorpusError, Document, tidy
from rgemma.corpus.rdata import read_lazyload

AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"^chapter\s+([ivxlc]+|\d+)\.?$", re.I)
_AUSTEN_SKIP = re.compile(r"^(volume\s+[ivx]+|the end|finis)\.?$", re.I)
# Northanger Abbey ends with a modern publisher's note on the edition, not Austen's.
_AUSTEN_STOP = re.compile(r"^a note on the text$", re.I)


def split_austen(key: str, lines: list) -> list[Document]:
    """One document per chapter; the title page before chapter 1, volume headings and end notes go.

    Each element is one line of the printed text, "" between paragraphs;
    `_word_` is Gutenberg's mark for italics.
    """
    chapters: list[list[str]] = []
    for line in lines:
        line = (line or "").strip()
        if _AUSTEN_STOP.match(line):
            break
        if _CHAPTER.match(line):
            chapters.append([])
        elif chapters and not _AUSTEN_SKIP.match(line):
            chapters[-1].append(line)
    documents = []
    for number, chapter in enumerate(chapters, 1):
        paragraphs = re.split(r"\n{2,}", "\n".join(chapter))
        text = tidy("\n\n".join(p.replace("\n", " ") for p in paragraphs))
        text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", text)
        if text:
            documents.append(Document("janeausten", f"{key}/{number:02d}", text))
    return documents


def read_janeausten(deb: Path) -> list[Document]:
    files = deb_files(deb, re.compile(r"/janeaustenr/data/Rdata\.rd[bx]$"))
    rdx = next((v for k, v in files.items() if k.endswith(".rdx")), None)
    rdb = next((v for k, v in files.items() if k.endswith(".rdb")), None)
    if rdx is None or rdb is None:
        raise CorpusError(f"{deb}: no janeaustenr/data/Rdata.rdx and .rdb (found {sorted(files)})")
    objects = read_lazyload(rdx, rdb, f"{deb.name}:Rdata")
    missing = sorted(set(AUSTEN_NOVELS) - set(objects))
    if missing:
        raise CorpusError(f"{deb}: Rdata lacks {missing} (has {sorted(objects)})")
    documents = []
    for key in AUSTEN_NOVELS:
        lines = objects[key]
        if not isinstance(lines, list) or not all(isinstance(s, str | None) for s in lines):
            raise CorpusError(f"{deb}: Rdata object {key} is not a character vector")
        chapters = split_austen(key, lines)
        if not chapters:
            raise CorpusError(f"{deb}: no chapter headings found in {key}")
        documents += chapters
    return documents
