"""Files inside a Debian package, read with the standard library alone: an `ar` archive of tarballs."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from rgemma.corpus.document import CorpusError


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


def deb_files(deb: Path, wanted: re.Pattern) -> dict[str, bytes]:
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
