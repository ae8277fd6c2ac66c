"""An index build, step by step: check, read and chunk, embed, publish (:class:`IndexBuild`).

The passages go from the read tasks to publish through parquet parts in the index folder
(:mod:`~pipelines.index.parts`), dropped when the build ends, done or failed.

    >>> summary = IndexBuild(IndexOptions("data/rag/corpus", "out/rag-index"), settings, print).run()  # doctest: +SKIP
    >>> summary.line()                                                                                # doctest: +SKIP
    'indexed /…/out/rag-index: 50 files read, 0 skipped; 463 passages: 463 embedded now, 0 reused, 0 removed, \
0 failed; flat index, 384-d all-minilm-l6-v2; 41.2 s'
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.endpoints.settings import EndpointSettings
from pipelines.documents import scan_corpus
from pipelines.index.base import IndexDir, IndexOptions, IndexSummary
from pipelines.index.check import check_embedder, check_index_dir
from pipelines.index.embed import EmbedStep, ray_connected
from pipelines.index.parts import PassageParts
from pipelines.index.publish import Publisher
from pipelines.index.read import CorpusReader


class IndexBuild:
    """One run of the index CLI: :meth:`run` does check, read, embed and publish, in that order."""

    def __init__(self, options: IndexOptions, embed: EndpointSettings, say: Callable[[str], None]):
        self.options, self.embed_settings, self.say = options, embed, say
        self.dir = IndexDir.at(options.index)
        self.index = self.dir.location
        self.summary = IndexSummary(self.index)

    def run(self) -> IndexSummary:
        start = time.perf_counter()
        options, summary, say = self.options, self.summary, self.say
        corpus = scan_corpus(options.corpus, options.exclude)  # a missing corpus fails before the index is touched
        previous = check_index_dir(self.dir, options)
        parts = PassageParts.start(self.dir)  # after dropping a killed build's
        discover = ray_connected()  # a cluster job connects before the read, so its files are read on the workers
        try:
            read = CorpusReader(options, self.dir, previous, summary, say).read(corpus, parts)
            with open_endpoints(embed=self.embed_settings, discover=discover, say=say) as endpoints:
                settings = endpoints.embed
                dim = check_embedder(self.dir, settings, previous)
                embedded = EmbedStep(options, self.dir, summary, say).run(parts, settings, dim)
            Publisher(options, self.dir, previous, summary, say).publish(read, embedded, settings, dim, start)
        finally:
            parts.drop()
        summary.seconds = time.perf_counter() - start
        return summary
