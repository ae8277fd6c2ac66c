"""The document readers, now shared by the index and the batch pipeline: :mod:`dspy_ray.corpus.documents`.

Kept so ``from pipelines.documents import scan_corpus, parse_bytes`` goes on working.
"""

from dspy_ray.corpus.documents import (
                                       BINARY_KINDS,
                                       DOCUMENT_KINDS,
                                       KINDS,
                                       RECORD_KINDS,
                                       TEXT_KINDS,
                                       Block,
                                       Corpus,
                                       CorpusError,
                                       CorpusFile,
                                       Document,
                                       Problem,
                                       RecordColumns,
                                       file_digest,
                                       html_document,
                                       parse_bytes,
                                       read_file,
                                       scan_corpus,
                                       split_blocks,
)

__all__ = ["BINARY_KINDS", "DOCUMENT_KINDS", "KINDS", "RECORD_KINDS", "TEXT_KINDS", "Block", "Corpus", "CorpusError",
           "CorpusFile", "Document", "Problem", "RecordColumns", "file_digest", "html_document", "parse_bytes",
           "read_file", "scan_corpus", "split_blocks"]
