"""The World English Bible from the Debian package sword-text-web: a SWORD zText module in OSIS markup."""

from __future__ import annotations

import html
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from rgemma.corpus.debian import deb_files
from rgemma.corpus.document import CorpusError, Document, tidy

# Footnotes, headings added by the editors, and speaker labels go with their
# contents; a title marked canonical (a psalm's superscription) is scripture and stays.
_OSIS_DROP = re.compile(r"<(note|title|speaker|catchWord)\b(?![^>]*canonical=\"true\")[^>]*(?:/>|>.*?</\1>)", re.S)
_OSIS_PARAGRAPH = re.compile(r"<(?:div\b[^>]*type=\"x-p\"|(?:lb|lg|title)\b)[^>]*>|</title>")
_OSIS_LINE = re.compile(r"<(?:l|item)\b[^>]*>|</item>")  # a line of poetry or of a list
_OSIS_CHAPTER = re.compile(r"<chapter\b[^>]*\b([se])ID=\"([^\"]+)\"[^>]*/>")
PARAGRAPH, LINE = "\x1d", "\x1e"


def osis_text(markup: str) -> str:
    # A dropped note often sits between two words with no space around it.
    text = _OSIS_DROP.sub(" ", markup)
    text = _OSIS_LINE.sub(LINE, _OSIS_PARAGRAPH.sub(PARAGRAPH, text))
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    # A paragraph break swallows the line breaks around it, and a run of line breaks is one.
    text = re.sub(rf"[\s{LINE}]*{PARAGRAPH}[\s{PARAGRAPH}{LINE}]*", "\n\n", text)
    text = re.sub(rf"[^\S\n]*{LINE}[\s{LINE}]*", "\n", text)
    return tidy(re.sub(r" +(?=[,.;:?!)’”])", "", text))


def osis_chapters(markup: str) -> Iterator[tuple[str, str]]:
    """(osisID, markup) per chapter, from its start milestone to its end, or to the next chapter's start
    where the module lacks the end (the Greek additions to Esther and Daniel do)."""
    current, start = None, 0
    for match in _OSIS_CHAPTER.finditer(markup):
        if current is not None:
            yield current, markup[start:match.start()]
        current, start = (match[2], match.end()) if match[1] == "s" else (None, 0)
    if current is not None:
        yield current, markup[start:]


def ztext_verses(bzs: bytes, bzv: bytes, bzz: bytes, name: str = "ztext") -> list[str]:
    """Every verse slot of one testament of a SWORD zText module, in order ("" for empty slots).

    .bzs: per compressed block, uint32 offset, size and uncompressed size in .bzz;
    .bzv: per verse, uint32 block, uint32 offset and uint16 size inside the
    uncompressed block; all little-endian, blocks zlib-compressed.
    """
    if len(bzs) % 12 or len(bzv) % 10:
        raise CorpusError(f"{name}: index sizes {len(bzs)} (.bzs) and {len(bzv)} (.bzv) are not multiples of 12 and 10")
    blocks = []
    for offset, size, plain in tqdm(struct.iter_unpack("<III", bzs), total=len(bzs) // 12, desc=name,
                                    unit="block", file=sys.stderr, leave=False):
        try:
            block = zlib.decompress(bzz[offset:offset + size]) if size else b""
        except zlib.error as e:
            raise CorpusError(f"{name}.bzz: block {len(blocks)} at {offset}+{size}: {e}") from e
        if len(block) != plain:
            raise CorpusError(f"{name}.bzz: block {len(blocks)} is {len(block)} bytes, .bzs says {plain}")
        blocks.append(block)
    verses = []
    for i, (block, offset, size) in enumerate(struct.iter_unpack("<IIH", bzv)):
        if size and (block >= len(blocks) or offset + size > len(blocks[block])):
            raise CorpusError(f"{name}.bzv: verse {i} points at block {block} bytes {offset}+{size}, outside the data")
        verses.append(blocks[block][offset:offset + size].decode() if size else "")
    return verses


def read_web_bible(deb: Path) -> list[Document]:
    """One document per chapter, ids like Gen.1; prefaces, book introductions and the glossary go."""
    files = deb_files(deb, re.compile(r"/modules/texts/ztext/[^/]+/(ot|nt)\.bz[svz]$"))
    documents = []
    for testament in ("ot", "nt"):
        parts = {k.rsplit(".", 1)[1]: v for k, v in files.items() if k.rsplit("/", 1)[1].startswith(testament + ".")}
        if sorted(parts) != ["bzs", "bzv", "bzz"]:
            raise CorpusError(f"{deb}: zText module lacks {testament}.bzs/.bzv/.bzz (found {sorted(files)})")
        stream = " ".join(ztext_verses(parts["bzs"], parts["bzv"], parts["bzz"], f"{deb.name}:{testament}"))
        # Chapters are milestones in the text itself, so no versification table is needed.
        for chapter, markup in osis_chapters(stream):
            text = osis_text(markup)
            if text:
                documents.append(Document("web_bible", chapter, text))
    if not documents:
        raise CorpusError(f"{deb}: no <chapter sID=...> ... <chapter eID=...> milestones in the module")
    return documents
