"""List a corpus: its indexable files, sorted by path, and what was ignored (other kinds, hidden, excluded).

    >>> corpus = scan_corpus("data/rag/corpus", exclude=("drafts/*",))  # doctest: +SKIP
    >>> corpus.files[0], corpus.ignored                                   # doctest: +SKIP
    (CorpusFile(path='animal_services/animal_services_overview.md', full='/…/animal_services_overview.md', \
size=4016, kind='md'), {})
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from dspy_ray.corpus.documents.base import KINDS, CorpusError
from dspy_ray.util.fs import filesystem_for, list_files


@dataclass(frozen=True)
class CorpusFile:
    path: str  # relative to the corpus root, posix
    full: str  # path inside the filesystem
    size: int
    kind: str


@dataclass
class Corpus:
    location: str
    fs: pafs.FileSystem
    root: str
    files: list[CorpusFile]
    ignored: dict[str, int]  # extension (or "hidden or excluded") -> count
    unsupported: list[str] = field(default_factory=list)  # files of other kinds, by corpus-relative path

    def read(self, f: CorpusFile) -> bytes:
        with self.fs.open_input_stream(f.full) as stream:
            return stream.read()


def scan_corpus(location: str, exclude: tuple[str, ...] = ()) -> Corpus:
    """The corpus's indexable files, sorted by path; raises :class:`CorpusError` when there is nothing to index.

    ``exclude``: glob patterns matched against corpus-relative paths (``genindex*.html``, ``drafts/*``).
    Paths with a component starting with ``.`` or ``_`` (``.git``, Sphinx's ``_sources``) are ignored.
    """
    try:
        fs, root = filesystem_for(location)
        info = fs.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"corpus {location}: cannot open ({_one_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus not found: {location}")
    try:
        listing = list_files(fs, root, info=info, hidden="path", exclude=exclude)
    except OSError as exc:
        raise CorpusError(f"corpus {location}: cannot list ({_one_line(exc)})") from None
    files = [CorpusFile(f.path, f.full, f.size, KINDS[f.suffix]) for f in listing.files if f.suffix in KINDS]
    unsupported = [f.path for f in listing.files if f.suffix not in KINDS]
    skipped = Counter(listing.skipped)
    skipped.update(PurePosixPath(p).suffix.lower() or "(no extension)" for p in unsupported)
    if not files:
        kinds = ", ".join(sorted(KINDS))
        found = f" (found only: {_counts(skipped)})" if skipped else ""
        raise CorpusError(f"corpus {location}: no files to index{found}; supported: {kinds}")
    return Corpus(location, fs, root, files, dict(skipped), unsupported)


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
