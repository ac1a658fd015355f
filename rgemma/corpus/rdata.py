"""R data, as the janeaustenr package stores its novels: serialized objects in a lazy-load database.

R's serialize() format, version 2 or 3, XDR (big-endian) flavour, as in
src/main/serialize.c. Each item starts with an int of flags: the type in the
low byte, then bit 8 "is object", bit 9 "has attributes", bit 10 "has tag",
and from bit 12 the "levels" (for a CHARSXP, its encoding).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
import sys
import zlib

from tqdm import tqdm

from rgemma.corpus.document import CorpusError

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
