"""Fit the extractive RAG answer's sentence ranker and its decline threshold on the TRAINING questions only.

    python benchmarks/rag_rank_fit.py                        # prints PER_SOURCE, WEIGHTS, CONFIDENCE_WEIGHTS,
                                                             # DECLINE_BELOW
    python benchmarks/rag_rank_fit.py --index out/rag-index  # reuse an index of data/rag/corpus

For each question of ``data/rag_train.jsonl`` the retriever (the shipped index,
the embedded embedder) returns its passages; every sentence of the top ones
gets :func:`programs.sentence_rank.sentence_features`.  A sentence is a right
answer when it comes from a gold document and the program's answer from it
(the sentence, or the quantity asked for in it: :func:`programs.extract.answer_span`)
contains the gold answer (or has token F1 >= 0.5 with it), as
``benchmarks/rag_quality.py`` grades.

* passages per document (``per_source``, the program's retrieval setting):
  the cap whose refitted ranker has the most right top sentences over five
  cross-validation folds, of 2 (the retriever's default, which wins a tie), 3
  and 0 (no cap);
* ranker: a softmax over each answerable question's sentences (L2-regularised
  gradient descent), so the right sentence scores highest;
* confidence: a logistic model of "the top sentence is right" over all
  training questions (the unanswerable ones are never right);
* threshold: the probability under which to decline that maximises, over
  five cross-validation folds (repeated with three shuffles, averaged), right
  answers plus declined unanswerable questions.

The numbers printed are pasted into :mod:`programs.sentence_rank`.  Dev
questions are never read: they are the report (``rag_quality.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP

from programs.sentence_rank import (  # noqa: E402
    PER_SOURCE,
    WEIGHTS,
    answer_confidence,
    confidence_features,
    kind_missing,
    rank_candidates,
)
from programs.similarity import MAX_SENTENCES, similarity_of  # noqa: E402
from rag_quality import right_sentence, shipped_index  # noqa: E402

RANK_NAMES = tuple(WEIGHTS)
CONFIDENCE_NAMES = tuple(confidence_features([]))
PER_SOURCE_CHOICES = (2, 3, 0)  # the retriever's default first: it wins a tie


def remembered(similarity):
    """``similarity`` with each (question, sentence) cosine kept: the caps compared share most sentences, and the
    embedder is the slow part (a call of more than one request's worth is passed through as the program makes it)."""
    if similarity is None:
        return None
    memo: dict[tuple[str, str], float | None] = {}

    def cosines(question, sentences):
        if len(sentences) > MAX_SENTENCES:
            return similarity(question, sentences)
        new = [s for s in dict.fromkeys(sentences) if (question, s) not in memo]
        if new:
            found = similarity(question, new)
            if found is None:
                return None
            memo.update(((question, s), c) for s, c in zip(new, found))
        return [memo[(question, s)] for s in sentences]

    return cosines


def question_data(rows: list[dict], passages: list[list], similarity=None) -> list[dict]:
    """Per question: its candidates' features (a matrix, :data:`RANK_NAMES` order) and which are right."""
    out = []
    for row, found in zip(rows, passages):
        candidates = rank_candidates(row["question"], found, similarity=similarity)
        right = [bool(row["answerable"]) and right_sentence(row, c.sentence, c.passage) for c in candidates]
        matrix = np.array([[c.features[n] for n in RANK_NAMES] for c in candidates], float).reshape(-1, len(RANK_NAMES))
        out.append({"row": row, "passages": found, "candidates": candidates, "X": matrix, "right": np.array(right),
                    "similarity": similarity})
    return out


def fit_ranker(data: list[dict], l2: float = 0.01, steps: int = 1500, rate: float = 0.5) -> np.ndarray:
    """Softmax weights over each question's candidates (questions with a right candidate only)."""
    usable = [d for d in data if d["right"].any()]
    w = np.zeros(len(RANK_NAMES))
    for _ in range(steps):
        grad = np.zeros_like(w)
        for d in usable:
            z = d["X"] @ w
            p = np.exp(z - z.max())
            p /= p.sum()
            grad += d["X"].T @ (p - d["right"] / d["right"].sum())
        w -= rate * (grad / len(usable) + l2 * w)
    return w


def top_right(data: list[dict], w: np.ndarray) -> int:
    return sum(bool(d["right"][np.argmax(d["X"] @ w)]) for d in data if len(d["X"]))


def cross_validated_top_right(data: list[dict], l2: float, folds: int = 5) -> int:
    """Right top sentences over held-out folds, the ranker refitted on the other folds each time."""
    order = list(range(len(data)))
    random.Random(1).shuffle(order)
    total = 0
    for f in range(folds):
        held = set(order[f::folds])
        w = fit_ranker([d for i, d in enumerate(data) if i not in held], l2=l2)
        total += top_right([d for i, d in enumerate(data) if i in held], w)
    return total


def confidence_data(data: list[dict], w: np.ndarray) -> tuple[np.ndarray, ...]:
    """(features in :data:`CONFIDENCE_NAMES` order, top sentence right, answerable, declined whatever the
    confidence: :func:`~programs.sentence_rank.kind_missing`) per question."""
    weights = dict(zip(RANK_NAMES, w))
    X, right, answerable, missing = [], [], [], []
    for d in data:
        ranked = rank_candidates(d["row"]["question"], d["passages"], weights=weights, similarity=d["similarity"])
        features = confidence_features(ranked)
        X.append([features[n] for n in CONFIDENCE_NAMES])
        top = ranked[0] if ranked else None
        right.append(bool(top) and bool(d["row"]["answerable"]) and right_sentence(d["row"], top.sentence, top.passage))
        answerable.append(bool(d["row"]["answerable"]))
        missing.append(kind_missing(d["row"]["question"], ranked))
    return np.array(X, float), np.array(right), np.array(answerable), np.array(missing)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 0.05, steps: int = 4000, rate: float = 0.3) -> dict:
    """Logistic weights on raw features (fitted on standardised ones, then unscaled), with ``bias``."""
    mu, sd = X.mean(0), X.std(0) + 1e-9
    Z = np.c_[(X - mu) / sd, np.ones(len(X))]
    w = np.zeros(Z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-Z @ w))
        grad = Z.T @ (p - y) / len(y)
        grad[:-1] += l2 * w[:-1]
        w -= rate * grad
    raw = w[:-1] / sd
    return {"bias": float(w[-1] - (raw * mu).sum()), **{n: float(v) for n, v in zip(CONFIDENCE_NAMES, raw)}}


def outcome(p: np.ndarray, right: np.ndarray, answerable: np.ndarray, below: float) -> dict:
    answer = p >= below
    return {"right": int((answer & right).sum()), "wrong": int((answer & ~right & answerable).sum()),
            "declined_unanswerable": int((~answer & ~answerable).sum()), "declined_answerable":
            int((~answer & answerable).sum())}


def choose_threshold(X: np.ndarray, right: np.ndarray, answerable: np.ndarray, missing: np.ndarray, folds: int = 5,
                     shuffles: int = 3) -> tuple[float, dict]:
    """The threshold maximising right answers + declined unanswerable over cross-validated probabilities (the
    counts averaged over ``shuffles`` different fold assignments: 11 unanswerable questions make one noisy)."""
    probabilities = []
    for seed in range(1, shuffles + 1):
        order = list(range(len(X)))
        random.Random(seed).shuffle(order)
        p = np.zeros(len(X))
        for f in range(folds):
            held = order[f::folds]
            kept = [i for i in order if i not in held]
            weights = fit_logistic(X[kept], right[kept])
            p[held] = [answer_confidence(dict(zip(CONFIDENCE_NAMES, x)), weights) for x in X[held]]
        probabilities.append(np.where(missing, 0.0, p))
    table = {}
    for t in np.round(np.arange(0.0, 0.75, 0.05), 2):
        counts = [outcome(p, right, answerable, t) for p in probabilities]
        table[t] = {key: round(sum(c[key] for c in counts) / shuffles, 1) for key in counts[0]}
    best = max(table, key=lambda t: (table[t]["right"] + table[t]["declined_unanswerable"], -t))
    return float(best), table


def choose_per_source(by_cap: dict[int, list[dict]], l2: float) -> int:
    """The cap whose ranker gets the most top sentences right, cross-validated (ties: the first listed)."""
    scores = {cap: cross_validated_top_right(data, l2) for cap, data in by_cap.items()}
    for cap, n in scores.items():
        print(f"  per_source {cap}: top sentence right {n} (5-fold cross-validation)")
    best = max(scores, key=lambda cap: (scores[cap], -list(scores).index(cap)))
    print(f"PER_SOURCE = {best}  (the shipped one: {PER_SOURCE})")
    return best


def report(data: list[dict], l2: float) -> None:
    """Fit and print the ranker's weights, the confidence model and the threshold (with its table)."""
    current = np.array([WEIGHTS[n] for n in RANK_NAMES])
    w = fit_ranker(data, l2=l2)
    print(f"{len(data)} training questions; {sum(d['right'].any() for d in data)} with a right sentence among "
          f"the candidates")
    print(f"top sentence right: {top_right(data, current)} with the shipped WEIGHTS, {top_right(data, w)} refitted")
    print("WEIGHTS =", {n: round(float(v), 2) for n, v in zip(RANK_NAMES, w)})
    X, right, answerable, missing = confidence_data(data, w)  # the refitted ranker's top sentences
    print(f"SIMILARITY_UNKNOWN = {X[:, CONFIDENCE_NAMES.index('similarity')].mean():.2f}  (the mean over these "
          f"questions of the top sentence's similarity)")
    print("CONFIDENCE_WEIGHTS =", {n: round(v, 2) for n, v in fit_logistic(X, right).items()})
    below, table = choose_threshold(X, right, answerable, missing)
    for t, counts in table.items():
        print(f"  decline below {t:.2f}: {counts}")
    print(f"DECLINE_BELOW = {below:.2f}  (cross-validated on the training questions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default=None, help="an index of data/rag/corpus (built there when missing)")
    parser.add_argument("--l2", type=float, default=0.01, help="L2 penalty of the ranker")
    args = parser.parse_args()

    from dspy_ray.endpoints.fallback import open_endpoints
    from dspy_ray.endpoints.settings import resolve_settings
    from dspy_ray.retrieval import open_retriever

    rows = [json.loads(line) for line in (ROOT / "data" / "rag_train.jsonl").read_text().splitlines() if line.strip()]
    with open_endpoints(lm=None, embed=resolve_settings("EMBED"), discover=False) as endpoints, \
            shipped_index(args.index, endpoints.embed) as index:
        retriever = open_retriever(index, endpoints.embed)
        similarity = remembered(similarity_of(retriever))  # the embedder is still up
        by_cap = {cap: question_data(rows, retriever.search_many([r["question"] for r in rows], per_source=cap),
                                     similarity) for cap in PER_SOURCE_CHOICES}
        report(by_cap[choose_per_source(by_cap, args.l2)], args.l2)
        retriever.close()


if __name__ == "__main__":
    main()
