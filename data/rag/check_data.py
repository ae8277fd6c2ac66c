"""Check the RAG corpus and its labelled questions, and print counts.

    python data/rag/check_data.py

Standard library only. Exits 1 and lists every problem when an invariant fails; prints
"fuzzy" notes (which never fail) where an answer's key words are not all in its evidence, or
where an answer also appears word for word in a document its row does not list.

Invariants checked:
- every corpus file is UTF-8; every HTML page has a <title>, <h1>, <nav>, <script>, <style> and
  <footer>; bulletins.jsonl records have id/title/text/date, unique ids, text of 40-150 words;
- question ids are unique across rag_train.jsonl and rag_dev.jsonl; every row has the six keys;
- an answerable row has a non-empty answer of at most 15 words, at least one source, one evidence
  string per source; each source file (or bulletins.jsonl#<record id>) exists; each evidence
  string is at least 25 characters and occurs verbatim in its source once whitespace runs are
  collapsed to single spaces (HTML: in the raw file, inside one visible text node, so it spans no
  tag; bulletins: in the record's text field);
- an unanswerable row has answer "", sources [] and evidence [].
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
SPLITS = {"train": HERE.parent / "rag_train.jsonl", "dev": HERE.parent / "rag_dev.jsonl"}
BULLETINS = "bulletins.jsonl"
HIDDEN_TAGS = {"script", "style", "nav", "footer"}  # boilerplate an ingester should drop
REQUIRED_HTML_TAGS = {"title", "h1", "nav", "script", "style", "footer"}
ROW_KEYS = {"id", "question", "answer", "sources", "evidence", "answerable"}
STOPWORDS = set("""a an and the of to in on at for from by with or is are was were be it its
this that as not no only than then after before into per each every their there about up
over under out if when who what which they them he she his her during""".split())


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class VisibleText(HTMLParser):
    """Collects text nodes outside script/style/nav/footer, and the tags seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.nodes: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag in HIDDEN_TAGS:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in HIDDEN_TAGS and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth and data.strip():
            self.nodes.append(norm(data))


def fmt(path: str) -> str:
    name = path.split("#")[0]
    ext = name.rsplit(".", 1)[-1]
    return "html" if ext == "htm" else ext


def load_corpus(errors: list[str]):
    """Returns ({relative path: searchable text}, {path: visible text nodes}, {record id: text},
    per-file word counts)."""
    texts, html_nodes, bulletins, words = {}, {}, {}, {}
    for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()):
        rel = path.relative_to(CORPUS).as_posix()
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            errors.append(f"{rel}: not UTF-8")
            continue
        if rel == BULLETINS:
            for n, line in enumerate(raw.splitlines(), 1):
                rec = json.loads(line)
                if set(rec) != {"id", "title", "text", "date"}:
                    errors.append(f"{rel}:{n}: keys {sorted(rec)}")
                if rec["id"] in bulletins:
                    errors.append(f"{rel}:{n}: duplicate record id {rec['id']}")
                n_words = len(rec["text"].split())
                if not 40 <= n_words <= 150:
                    errors.append(f"{rel}:{n}: text has {n_words} words (want 40-150)")
                bulletins[rec["id"]] = norm(rec["text"])
            words[rel] = sum(len(t.split()) for t in bulletins.values())
            continue
        texts[rel] = norm(raw)
        if fmt(rel) == "html":
            parser = VisibleText()
            parser.feed(raw)
            missing = REQUIRED_HTML_TAGS - parser.tags
            if missing:
                errors.append(f"{rel}: HTML page lacks {sorted(missing)}")
            html_nodes[rel] = parser.nodes
            words[rel] = sum(len(n.split()) for n in parser.nodes)
        else:
            words[rel] = len(raw.split())
    return texts, html_nodes, bulletins, words


def key_words(answer: str) -> list[str]:
    tokens = re.findall(r"[\w$.,%°'/-]+", answer.lower())
    tokens = [t.strip(".,'\"") for t in tokens]
    return [t for t in tokens if t and t not in STOPWORDS]


def check_rows(texts, html_nodes, bulletins, errors, notes):
    rows_by_split = {}
    seen = {}
    for split, path in SPLITS.items():
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            where = f"{path.name}:{n} ({row.get('id')})"
            if set(row) != ROW_KEYS:
                errors.append(f"{where}: keys {sorted(row)}")
                continue
            if row["id"] in seen:
                errors.append(f"{where}: id also used in {seen[row['id']]}")
            seen[row["id"]] = where
            rows.append(row)
            if not isinstance(row["answerable"], bool) or not row["question"].strip():
                errors.append(f"{where}: bad answerable flag or empty question")
                continue
            if not row["answerable"]:
                if row["answer"] != "" or row["sources"] or row["evidence"]:
                    errors.append(f"{where}: unanswerable row must have empty answer/sources/evidence")
                continue
            check_answerable(row, where, texts, html_nodes, bulletins, errors, notes)
        rows_by_split[split] = rows
    return rows_by_split


def check_answerable(row, where, texts, html_nodes, bulletins, errors, notes):
    answer, sources, evidence = row["answer"], row["sources"], row["evidence"]
    if not answer.strip() or len(answer.split()) > 15:
        errors.append(f"{where}: answer empty or longer than 15 words")
    if not sources:
        errors.append(f"{where}: answerable row without sources")
    if len(evidence) != len(sources):
        errors.append(f"{where}: {len(sources)} sources but {len(evidence)} evidence strings")
        return
    if len(set(sources)) != len(sources):
        errors.append(f"{where}: a source is listed twice")
    for src, ev in zip(sources, evidence):
        ev_n = norm(ev)
        if len(ev_n) < 25:
            errors.append(f"{where}: evidence for {src} is shorter than 25 characters")
        if "#" in src:
            doc, rid = src.split("#", 1)
            if doc != BULLETINS or rid not in bulletins:
                errors.append(f"{where}: no bulletin record {src}")
            elif ev_n not in bulletins[rid]:
                errors.append(f"{where}: evidence not in {src}: {ev!r}")
        elif src not in texts:
            errors.append(f"{where}: no such source file {src}")
        elif fmt(src) == "html":
            if "<" in ev or ">" in ev or ev_n not in texts[src]:
                errors.append(f"{where}: evidence not verbatim in {src}: {ev!r}")
            elif not any(ev_n in node for node in html_nodes[src]):
                errors.append(f"{where}: evidence in {src} spans tags or sits in boilerplate: {ev!r}")
        elif ev_n not in texts[src]:
            errors.append(f"{where}: evidence not verbatim in {src}: {ev!r}")
    joined = " ".join(norm(e).lower() for e in evidence)
    missing = [w for w in key_words(answer) if w not in joined]
    if missing:
        notes.append(f"fuzzy {row['id']}: answer words {missing} not literally in evidence "
                     f"(answer {answer!r})")
    # An answer that appears word for word in an unlisted document may mean a missing source.
    if len(answer) >= 6 and re.search(r"\d", answer):
        needle = norm(answer)
        listed = {s.split("#")[0] for s in sources}
        others = [p for p, t in texts.items() if p not in listed and needle in t]
        if others:
            notes.append(f"fuzzy {row['id']}: answer {answer!r} also appears in unlisted {others}")


def report(texts, bulletins, words, rows_by_split):
    docs = Counter(fmt(p) for p in texts)
    docs["jsonl records"] = len(bulletins)
    word_by_fmt = Counter()
    for p, n in words.items():
        word_by_fmt[fmt(p)] += n
    print("Corpus documents per format:")
    for k in ("md", "txt", "rst", "html"):
        print(f"  {k:<6} {docs[k]:>3} files  {word_by_fmt[k]:>6} words")
    print(f"  jsonl    1 file ({len(bulletins)} records)  {word_by_fmt['jsonl']:>6} words")
    n_files = len(texts) + 1
    total = sum(words.values())
    print(f"  total  {n_files:>3} files  {total:>6} words")
    short = {p: n for p, n in words.items() if p != BULLETINS and not 250 <= n <= 1200}
    if short:
        print(f"  note: documents outside 250-1,200 words: {short}")
    print("Questions per split:")
    for split, rows in rows_by_split.items():
        unans = sum(not r["answerable"] for r in rows)
        multi = sum(len(r["sources"]) > 1 for r in rows)
        print(f"  {split:<5} {len(rows):>3} rows  ({unans} unanswerable, {multi} with 2+ sources)")
    print("Answerable questions per source format (a row counts once per format it cites):")
    for split, rows in rows_by_split.items():
        c = Counter()
        for r in rows:
            for f in {fmt(s) for s in r["sources"]}:
                c[f] += 1
        print(f"  {split:<5} " + "  ".join(f"{k}={c[k]}" for k in ("md", "txt", "rst", "html", "jsonl")))
    cited = {s.split("#")[0] for rows in rows_by_split.values() for r in rows for s in r["sources"]}
    uncited = sorted(set(texts) - cited)
    if uncited:
        print(f"  note: documents no question cites: {uncited}")


def main() -> int:
    errors: list[str] = []
    notes: list[str] = []
    texts, html_nodes, bulletins, words = load_corpus(errors)
    rows_by_split = check_rows(texts, html_nodes, bulletins, errors, notes)
    report(texts, bulletins, words, rows_by_split)
    for note in notes:
        print(note)
    if errors:
        print(f"\nFAILED: {len(errors)} problem(s)")
        for e in errors:
            print("  " + e)
        return 1
    print("\nOK: all invariants hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
