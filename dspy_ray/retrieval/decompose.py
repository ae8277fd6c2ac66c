"""Multi-part questions without a model: sub-queries split at conjunctions, and at most N passages per document.

A question that needs two pages ("read a CSV file and write it out as JSON")
ranks passages of one page first: each page matches half the words, and the
page that matches its half best fills the top k.  Two plain remedies, measured
in ``benchmarks/pydocs_rag.py``:

* **sub-queries**: the question is cut at conjunctions and clause marks
  ("and", "then", "while", ",", ";"...) into parts of at least two content
  words; each part is searched too, and the rankings fused (reciprocal rank);
  the best passage of each part is kept in the top k (:func:`cover_parts`);
* **per-source cap**: at most ``per_source`` passages of one document in the
  top k, so a second document gets a place.

    >>> subqueries("How do I read the rows of a CSV file and write them out as JSON?")
    ['How do I read the rows of a CSV file', 'write them out as JSON?']
    >>> subqueries("What is the easiest way to tally items?")
    []
    >>> cap_per_source([(0, 1.0), (1, 0.9), (2, 0.8)], ["a.html", "a.html", "b.html"], per_source=1, k=2)
    [(0, 1.0), (2, 0.8)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SPLIT = re.compile(r",?\s+(?:and then|and|then|while|together with|as well as)\s+|,\s+|;\s+", re.IGNORECASE)
_CONTENT_WORD = re.compile(r"[A-Za-z]{3,}")
MAX_PARTS = 4


def subqueries(query: str) -> list[str]:
    """The parts of ``query`` worth searching alone (two or more words of 3+ letters each); [] when it has one."""
    parts = [p.strip() for p in _SPLIT.split(str(query)) if len(_CONTENT_WORD.findall(p)) >= 2]
    return parts[:MAX_PARTS] if len(parts) > 1 else []


def cover_parts(fused: Sequence[tuple[int, float]], part_best: Sequence[int], k: int) -> list[tuple[int, float]]:
    """``fused`` with each part's best row (``part_best``) moved into the first ``k`` places if it is not there:
    the fused order favours the part that shares most words with the whole question.

    >>> cover_parts([(1, .3), (2, .2), (3, .1), (4, .05)], [1, 4], k=2)
    [(1, 0.3), (4, 0.05), (2, 0.2), (3, 0.1)]
    """
    top = {row for row, _ in fused[:k]}
    missing = [row for row in dict.fromkeys(part_best) if row not in top]
    if not missing:
        return list(fused)
    keep = k - len(missing)
    moved = [hit for hit in fused if hit[0] in missing]
    rest = [hit for hit in fused if hit[0] not in missing]
    return rest[:max(keep, 0)] + moved + rest[max(keep, 0):]


def cap_per_source(hits: Sequence[tuple[int, float]], sources: Sequence[str], per_source: int | None,
                   k: int) -> list[tuple[int, float]]:
    """The first ``k`` of ``hits`` (row, score) keeping at most ``per_source`` rows of each source
    (``sources[row]``); None: no cap.  Order is kept, so a document's best passage only moves up."""
    if not per_source:
        return list(hits[:k])
    out: list[tuple[int, float]] = []
    taken: dict[str, int] = {}
    for row, score in hits:
        source = sources[row]
        if taken.get(source, 0) < per_source:
            out.append((row, score))
            taken[source] = taken.get(source, 0) + 1
            if len(out) == k:
                break
    return out
