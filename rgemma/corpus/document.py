"""What every reader returns: documents with tidy text, and the one error a reader raises."""

from __future__ import annotations

import dataclasses
import re


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
