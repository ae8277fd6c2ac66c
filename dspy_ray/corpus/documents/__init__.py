"""Files to documents, for the index and the batch pipeline alike: a folder (recursive) or one file, on
local disk or object storage.

What lives here, one module per step:

* :mod:`~dspy_ray.corpus.documents.corpus` lists the corpus (:func:`scan_corpus`);
* :mod:`~dspy_ray.corpus.documents.parse` turns one file's bytes into documents (:func:`parse_bytes`), with the
  reader for its kind: :mod:`~dspy_ray.corpus.documents.text` (txt, md, rst), :mod:`~dspy_ray.corpus.documents.html`,
  :mod:`~dspy_ray.corpus.documents.records` (jsonl, csv, parquet),
  :mod:`~dspy_ray.corpus.documents.pdf`, :mod:`~dspy_ray.corpus.documents.word` (docx),
  :mod:`~dspy_ray.corpus.documents.mail` (eml), over :mod:`~dspy_ray.corpus.documents.assemble`;
* :mod:`~dspy_ray.corpus.documents.blocks` splits a text into paragraphs and headings, one rule set per format;
* :mod:`~dspy_ray.corpus.documents.base` holds what they share: :class:`Document`, :class:`Block`, :class:`Problem`.

Document kinds, by extension:

=====================  =====================================================================
``.txt``               paragraphs split by blank lines; headings: ``===``/``---`` underlined,
                       ALL CAPS lines, or short stand-alone lines without end punctuation
``.md``, ``.markdown`` ``#`` headings and ``===``/``---`` underlined ones (not inside code fences)
``.rst``               titles underlined (and maybe overlined) with one repeated punctuation mark
``.html``, ``.htm``    visible text from an HTML parser (BeautifulSoup, ``html.parser``): scripts,
                       styles, navigation, headers without an ``h1``, footers, forms, hidden
                       elements, cookie banners and breadcrumbs dropped; ``<title>`` kept as the
                       title, ``h1``-``h6`` as headings, table rows as ``cell | cell`` lines
``.pdf``               the text layer (pypdfium2), each page a section ``page N``; encrypted,
                       unreadable or text-less (scanned) PDFs are problems, never empty documents
``.docx``              paragraphs and tables in order; Title / Heading N styles as headings
``.eml``               Subject, From, To, Date as the first section, the plain body (else the
                       HTML one as text), attachments listed by name, type and size
``.jsonl``, ``.csv``,  one document per record: ``--text-column`` (default ``text``),
``.parquet``           ``--title-column`` (``title``), ``--id-column`` (``id``; else the line or
                       row number); its source is ``<file>#<record id>``
=====================  =====================================================================

A document's ``text`` is what passage offsets point into: the decoded file
for txt/md/rst (unchanged), the extracted text for HTML (blocks joined by blank
lines), the text field for a record.  Text files must be UTF-8 (a BOM is
fine); HTML may declare another charset in a ``<meta>`` tag.

Errors are data: an unreadable, undecodable or empty file, a file without the
text column, a bad record (broken JSON line, empty text, duplicate id) is a
:class:`Problem` naming the file (and line or record) — reported and counted,
never silently dropped.  Files of other kinds (images, scripts) and paths with a
component starting with ``.`` or ``_`` (``.git``, Sphinx's ``_sources``) are
*ignored*, counted by extension in the summary.

    >>> corpus = scan_corpus("data/rag/corpus")                        # doctest: +SKIP
    >>> len(corpus.files), corpus.ignored                              # doctest: +SKIP
    (50, {})
    >>> docs, problems = read_file(corpus, corpus.files[0])            # doctest: +SKIP
    >>> docs[0].source, docs[0].title, docs[0].blocks[0]               # doctest: +SKIP
    ('animal_services/animal_services_overview.md', 'Wrenhaven Animal Services', Block(start=0, end=27, level=1))
"""

from dspy_ray.corpus.documents.base import (
    BINARY_KINDS,
    DOCUMENT_KINDS,
    KINDS,
    RECORD_KINDS,
    TEXT_KINDS,
    Block,
    CorpusError,
    Document,
    Problem,
    RecordColumns,
)
from dspy_ray.corpus.documents.blocks import split_blocks
from dspy_ray.corpus.documents.corpus import (
    Corpus,
    CorpusFile,
    file_digest,
    scan_corpus,
)
from dspy_ray.corpus.documents.html import html_document
from dspy_ray.corpus.documents.parse import parse_bytes, read_file

__all__ = ["BINARY_KINDS", "DOCUMENT_KINDS", "KINDS", "RECORD_KINDS", "TEXT_KINDS", "Block", "Corpus", "CorpusError", "CorpusFile", "Document",
           "Problem", "RecordColumns", "file_digest", "html_document", "parse_bytes", "read_file", "scan_corpus",
           "split_blocks"]
