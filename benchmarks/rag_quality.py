"""Does RAG on the embedded default answer?  Today's program, the extractive ones and a no-LM baseline, side by side.

    python benchmarks/rag_quality.py                        # all 50 dev questions; today's program on the first 8
    python benchmarks/rag_quality.py --index out/rag-index  # reuse an index of data/rag/corpus (else built in a tmp dir)
    python benchmarks/rag_quality.py --configs baseline,extract --limit 20
    python benchmarks/rag_quality.py --save-artifact data/artifacts   # also write the extract program's artifact
                                                                      # (the one the embedded default loads)

On the embedded models (no endpoint configured: SmolLM2-135M on llama.cpp and
all-MiniLM-L6-v2), each question of ``data/rag_dev.jsonl`` goes through the
framework's own runner (ProgramRunner: retries, Refine with the task's reward),
one at a time, so s/question is the wall time of one answer.  Configurations:

* ``today``: ``CitedRAG`` as written (rewrite the question, then the model writes
  the answer and its citations);
* ``extract``: ``CitedRAG(answer_style="extract")`` as the shipped artifact sets it:
  the question is the search query, searched with no cap of passages per document
  (``per_source``, :data:`programs.sentence_rank.PER_SOURCE`), the sentences of the top passages are ranked
  without a model (:mod:`programs.sentence_rank`), the top one is the answer (cut down to the quantity it
  states when the question asks for one: :func:`programs.extract.answer_span`), and
  the program declines when the ranker's confidence is under its threshold (both
  fitted on the training questions by ``benchmarks/rag_rank_fit.py``);
* ``extract-nodecline``: the same, never declining (``decline_below=0``);
* ``extract-cap2``: the same with the retriever's own cap, 2 passages per document (as before
  ``per_source`` was a program setting);
* ``extract-model``: the same ranking, but the model picks one of the best 4 or
  ``none`` (``chooser="model"``);
* ``extract-knn2``: that with a demo pool made from ``data/rag_train.jsonl`` only
  (2 nearest demos per question);
* ``baseline``: no LM: the first sentence of the top passage, citing it.

An answerable question is right when the answer contains the gold answer
(lower-cased, punctuation dropped) or has token F1 >= 0.5 with it, AND a cited
passage comes from a document that states it.  An unanswerable one is right when
the program declines (``answerable`` false, nothing cited).

Each answerable question answered wrong is put down to where it was lost (the
first that applies), from the passages the question retrieves:
``retrieval`` (no retrieved passage of a gold document holds the answer or its
gold evidence),
``sentence`` (one does, but no single sentence of it passes the grading),
``beyond top 3`` (only passages the ranker does not read hold it), ``ranking``
(a right sentence is a candidate, but not the top one - for the model configs:
not among the 4 shown), ``choice`` (the model picked another of the 4 shown, or
none), ``declined`` (the program declined although its top sentence was right),
``other`` (the rest: a declined question whose top sentence was wrong counts
where that sentence was lost; ``today`` and ``baseline`` put what is not
``retrieval`` or ``sentence`` here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP

CONFIGS = ("today", "extract", "extract-nodecline", "extract-cap2", "extract-model", "extract-knn2", "baseline")
MISSES = ("retrieval", "sentence", "beyond top 3", "ranking", "choice", "declined", "other")


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def is_right(answer: str, gold: str) -> bool:
    from dspy_ray.execution.scoring import token_f1

    return bool(normalize(gold)) and (normalize(gold) in normalize(answer) or token_f1(answer, gold) >= 0.5)


def grade(row: dict, answer: str, answerable, cited_sources: list[str]) -> dict:
    """{'right', 'cited_gold', 'declined'} for one answer to one question."""
    declined = not answerable and not cited_sources
    gold = bool(set(cited_sources) & set(row.get("sources") or []))
    if row["answerable"]:
        return {"right": bool(answerable) and gold and is_right(answer, row["answer"]), "cited_gold": gold,
                "declined": declined}
    return {"right": declined, "cited_gold": False, "declined": declined}


def first_sentence_answer(retriever, question: str) -> tuple[str, bool, list[str]]:
    """The no-LM baseline: the first sentence of the top passage, citing it."""
    from programs.extract import sentences

    passages = retriever.search(question)
    if not passages:
        return "", False, []
    return (sentences(passages[0].text) or [passages[0].text])[0], True, [passages[0].source]


def choice_demos(retriever, train: list[dict], per_source: int | None = None) -> list:
    """Demos for the extract program's chooser, from training questions only: the sentences it would be shown
    and the number of the first one that answers (from a gold document), or none."""
    import dspy

    from programs.rag import CANDIDATE_SENTENCES
    from programs.sentence_rank import rank_candidates
    from programs.similarity import similarity_of

    demos = []
    for row in train:
        candidates = rank_candidates(row["question"], retriever.search(row["question"], per_source=per_source),
                                     similarity=similarity_of(retriever))[:CANDIDATE_SENTENCES]
        if not candidates:
            continue
        choice = "none"
        if row["answerable"]:
            choice = next((str(n) for n, c in enumerate(candidates, 1) if right_sentence(row, c.sentence, c.passage)),
                          "none")
        listed = "\n".join(f"{n}. {c.sentence}" for n, c in enumerate(candidates, 1))
        demos.append(dspy.Example(question=row["question"], sentences=listed, choice=choice))
    return demos


def right_sentence(row: dict, sentence: str, passage) -> bool:
    """Whether ``sentence`` of ``passage`` would be a right answer to ``row`` (a gold document, the gold answer),
    answered as the extract program answers with it (cut down to the quantity asked for when it states one)."""
    from programs.extract import answer_text

    return getattr(passage, "source", None) in (row.get("sources") or []) and is_right(
        answer_text(sentence, row["question"]), row["answer"])


def build_program(config: str, retriever, train: list[dict]):
    from programs.rag import CitedRAG
    from programs.sentence_rank import PER_SOURCE

    if config == "today":
        return CitedRAG(retriever=retriever)
    program = CitedRAG(retriever=retriever, answer_style="extract",
                       chooser="model" if config in ("extract-model", "extract-knn2") else "ranker",
                       per_source=None if config == "extract-cap2" else PER_SOURCE)
    if config == "extract-nodecline":
        program.decline_below = 0.0
    if config == "extract-knn2":
        program.choose.demos = choice_demos(retriever, train, program.per_source)
    return program


def miss_reason(config: str, row: dict, retriever, declined: bool, decline_below: float,
                per_source: int | None = None) -> str:
    """Where an answerable question answered wrong was lost (see the module docstring), from the passages the
    program retrieves (``per_source``: its cap of passages per document, None: the retriever's)."""
    from programs.extract import sentences
    from programs.rag import CANDIDATE_SENTENCES
    from programs.sentence_rank import FROM_TOP, answer_confidence, confidence_features, kind_missing, rank_candidates
    from programs.similarity import similarity_of

    passages = retriever.search(row["question"], per_source=per_source)
    gold = [p for p in passages if p.source in row["sources"]]
    stated = [normalize(row["answer"])] + [normalize(e) for e in row.get("evidence") or []]
    if not any(any(e and e in normalize(p.text) for e in stated) or any(is_right(s, row["answer"])
                                                                       for s in sentences(p.text)) for p in gold):
        return "retrieval"
    if not any(right_sentence(row, s, p) for p in gold for s in sentences(p.text)):
        return "sentence"
    if config in ("today", "baseline"):
        return "other"
    if not any(right_sentence(row, s, p) for p in passages[:FROM_TOP] for s in sentences(p.text)):
        return "beyond top 3"
    ranked = rank_candidates(row["question"], passages, similarity=similarity_of(retriever))
    model = config in ("extract-model", "extract-knn2")
    shown = ranked[:CANDIDATE_SENTENCES] if model else ranked[:1]
    if not any(right_sentence(row, c.sentence, c.passage) for c in shown):
        return "ranking"
    if declined and (answer_confidence(confidence_features(ranked)) < decline_below
                     or kind_missing(row["question"], ranked)):
        return "declined" if right_sentence(row, ranked[0].sentence, ranked[0].passage) else "ranking"
    return "choice" if model else "other"


def run_config(config: str, rows: list[dict], retriever, runner_for, train: list[dict]) -> tuple[list[dict], float]:
    """Each row's grade (with ``miss``: where a wrong answerable one was lost), and the seconds per question."""
    answers = []
    program = None if config == "baseline" else build_program(config, retriever, train)
    decline_below = getattr(program, "decline_below", 0.0)
    per_source = getattr(program, "per_source", None)
    start = time.perf_counter()
    for row in rows:
        if program is None:
            answers.append(first_sentence_answer(retriever, row["question"]))
            continue
        pred = runner_for(program).run({"question": row["question"]}).prediction
        answers.append((str(getattr(pred, "answer", "") or "") if pred is not None else "",
                        getattr(pred, "answerable", False) if pred is not None else False,
                        [c.source for c in (getattr(pred, "cited", None) or [])] if pred is not None else []))
    per_question = (time.perf_counter() - start) / max(1, len(rows))
    grades = []
    for row, (answer, answerable, sources) in zip(rows, answers):
        g = grade(row, answer, answerable, sources)
        if row["answerable"] and not g["right"]:
            g["miss"] = miss_reason(config, row, retriever, g["declined"], decline_below, per_source)
        grades.append(g)
    return grades, per_question


def summarize(rows: list[dict], grades: list[dict]) -> str:
    """One row of the table: answerable right (share), gold document cited, unanswerable declined, answerable
    declined."""
    ans = [g for r, g in zip(rows, grades) if r["answerable"]]
    una = [g for r, g in zip(rows, grades) if not r["answerable"]]
    right = sum(g["right"] for g in ans)
    cited = sum(g["cited_gold"] for g in ans)
    declined = sum(g["declined"] for g in una)
    wrongly = sum(g["declined"] for g in ans)
    share = f"{right / len(ans):.2f}" if ans else "-"
    return (f"{right:>3}/{len(ans):<3} {share:>5}  {cited:>3}/{len(ans):<3}  {declined:>3}/{len(una):<3}  "
            f"{wrongly:>3}/{len(ans):<3}")


def misses(grades: list[dict]) -> str:
    """Where the wrong answerable questions were lost: "retrieval 5, sentence 6, ..." (see the docstring)."""
    counts = {m: sum(g.get("miss") == m for g in grades) for m in MISSES}
    return ", ".join(f"{m} {n}" for m, n in counts.items() if n) or "none"


@contextlib.contextmanager
def shipped_index(path: str | None, embed):
    """An index of data/rag/corpus: ``path`` when given and built, else one built in a temporary folder."""
    if path and Path(path, "manifest.json").exists():
        yield path
        return
    import ray

    from pipelines.index import IndexBuild, IndexOptions

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    with tempfile.TemporaryDirectory() as tmp:
        target = path or f"{tmp}/index"
        IndexBuild(IndexOptions(corpus=str(ROOT / "data" / "rag" / "corpus"), index=target), embed,
                   lambda line: None).run()
        yield target
    ray.shutdown()


def save_artifact(program, out_dir: str, settings, score: float, limit: int) -> str:
    from dspy_ray.endpoints.local.llm_server import MODEL_ALIAS
    from dspy_ray.execution.artifacts import ArtifactMetadata, redacted_settings
    from dspy_ray.execution.artifacts import save_artifact as save

    # dev_score: the share of dev questions handled right (answered from a gold document, or declined).
    meta = ArtifactMetadata(program="rag", model=MODEL_ALIAS, lm=redacted_settings(settings), optimizer="none",
                            optimizer_settings={"answer_style": program.answer_style, "chooser": program.chooser,
                                                "decline_below": program.decline_below,
                                                "per_source": program.per_source, "demos": 0,
                                                "dev_questions": limit,
                                                "weights": "programs/sentence_rank.py, fitted on rag_train.jsonl"},
                            command="python benchmarks/rag_quality.py --configs extract --save-artifact "
                                    + out_dir, dev_score=round(score, 3))
    return save(program, out_dir, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default=None, help="an index of data/rag/corpus (built there when missing)")
    parser.add_argument("--limit", type=int, default=50, help="dev questions (default: all 50)")
    parser.add_argument("--today-limit", type=int, default=8,
                        help="dev questions for today's program (about 25 s each on 2 idle cores)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--save-artifact", default=None, help="write the extract program here as an artifact")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")

    from dspy_ray.client.lm import build_lm
    from dspy_ray.endpoints.fallback import open_endpoints
    from dspy_ray.endpoints.settings import resolve_settings
    from dspy_ray.retrieval import open_retriever
    from tasks import get_task

    task = get_task("rag")
    read = lambda name: [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines() if line.strip()]
    dev, train = read("rag_dev.jsonl")[: args.limit], read("rag_train.jsonl")
    load0 = os.getloadavg()[0]
    with open_endpoints(lm=resolve_settings("LM"), embed=resolve_settings("EMBED"), discover=False) as endpoints, \
            shipped_index(args.index, endpoints.embed) as index:
        retriever = open_retriever(index, endpoints.embed)
        lm = build_lm(endpoints.lm)
        runner_for = lambda program: task.runner(program, lm, max_in_flight=1)
        print(f"LM {endpoints.lm.model} ({endpoints.lm.origin}), embedder {endpoints.embed.model}; {len(dev)} dev "
              f"questions ({sum(r['answerable'] for r in dev)} answerable); load average {load0:.1f} on "
              f"{os.cpu_count()} cores at the start", flush=True)
        results = {}
        for config in configs:
            rows = dev[: args.today_limit] if config == "today" else dev
            grades, per_q = run_config(config, rows, retriever, runner_for, train)
            results[config] = (rows, grades, per_q)
            print(f"  {config}: {per_q:.1f} s/question", flush=True)
            if config == "extract" and args.save_artifact:
                score = sum(g["right"] for g in grades) / len(grades)
                program = build_program(config, retriever, train)
                print(f"  artifact: {save_artifact(program, args.save_artifact, endpoints.lm, score, len(rows))}")
        retriever.close()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine is shared)")
    print(f"{'program':<28} {'answerable right':>16}  {'gold doc':>8}  {'unans. declined':>15}  "
          f"{'ans. declined':>13}  {'s/q':>5}")
    for config, (rows, grades, per_q) in results.items():
        print(f"{config:<28} {summarize(rows, grades):>58}  {per_q:5.1f}")
        if config == "today" and len(rows) < len(dev):
            for other, (_, g2, _) in results.items():
                if other != "today":
                    label = f"  {other} (same {len(rows)})"
                    print(f"{label:<28} {summarize(rows, g2[: len(rows)]):>58}")
    print("\nwhere the wrong answerable questions were lost (first that applies):")
    for config, (rows, grades, _) in results.items():
        print(f"  {config:<18} {misses(grades)}")


if __name__ == "__main__":
    main()
