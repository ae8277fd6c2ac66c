"""Reading a corpus (every file kind, bad files) and chunking it: no Ray, no endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.chunking import TOKEN, ChunkSettings, chunk_document
from pipelines.documents import Corpus, CorpusError, RecordColumns, parse_bytes, read_file, scan_corpus

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "rag" / "corpus"


def _norm(text: str) -> str:
    return " ".join(text.split())


def _one(path: str, kind: str, raw: bytes, **columns):
    docs, problems = parse_bytes(path, kind, raw, RecordColumns(**columns) if columns else RecordColumns())
    return docs, problems


# -- the shipped corpus -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    corpus = scan_corpus(str(CORPUS))
    docs, problems = {}, []
    for f in corpus.files:
        found, bad = read_file(corpus, f)
        problems += bad
        docs.update({d.source: d for d in found})
    return corpus, docs, problems


def test_shipped_corpus_reads_every_file_without_problems(shipped):
    corpus, docs, problems = shipped
    assert len(corpus.files) == 50 and corpus.ignored == {}
    assert problems == []
    kinds = {f.kind for f in corpus.files}
    assert kinds == {"md", "txt", "rst", "html", "jsonl"}
    assert len([s for s in docs if s.startswith("bulletins.jsonl#")]) == 13
    assert "bulletins.jsonl#SB-2025-014" in docs


def test_every_evidence_string_is_in_one_passage_of_its_source(shipped):
    """The QA sets' evidence is verbatim in its source: extraction and chunking must both keep it whole."""
    _, docs, _ = shipped
    rows = [json.loads(line) for name in ("rag_train.jsonl", "rag_dev.jsonl")
            for line in (ROOT / "data" / name).read_text().splitlines() if line.strip()]
    settings = ChunkSettings()
    chunks = {source: [_norm(c.text) for c in chunk_document(doc, settings)] for source, doc in docs.items()}
    checked = 0
    for row in rows:
        for source, evidence in zip(row["sources"], row["evidence"]):
            assert _norm(evidence) in _norm(docs[source].text), (row["id"], source)
            assert any(_norm(evidence) in text for text in chunks[source]), (row["id"], source)
            checked += 1
    assert checked == 168


def test_html_drops_boilerplate_and_keeps_title_headings_and_tables(shipped):
    _, docs, _ = shipped
    page = docs["dispatch/non_emergency_lines.html"]
    assert page.title == "Non-Emergency Phone Numbers | Wrenhaven County"
    for dropped in ("This site uses cookies", "Report Online", "Page last reviewed", "localStorage",
                    "border-collapse"):
        assert dropped not in page.text
    assert "Animal Services dispatch | (555) 310-4477 | 7:00 a.m. to 11:00 p.m. daily" in page.text
    headings = list(page.headings.values())
    assert headings[:2] == ["Non-Emergency Phone Numbers", "The main non-emergency line"]
    levels = [b.level for b in page.blocks if b.level]
    assert levels[0] == 1 and set(levels[1:]) == {2}


def test_markdown_rst_and_text_headings(shipped):
    _, docs, _ = shipped
    md = docs["dispatch/priority_codes.md"]
    assert md.title == "Call Priority Codes"
    assert "Priority 1 — Red" in md.headings.values()
    rst = docs["ems/cardiac_arrest_protocol.rst"]  # an overlined title, then underlined sections
    assert rst.title == "Out-of-Hospital Cardiac Arrest"
    assert "Telephone CPR" in rst.headings.values()
    txt = docs["fire/stations/station_7_kettle_bay.txt"]  # === / --- underlines
    assert txt.title == "Station 7 — Kettle Bay" and "Marine 7" in txt.headings.values()
    caps = docs["dispatch/radio_channels.txt"]  # ALL CAPS headings
    assert "PRIMARY TALKGROUPS" in caps.headings.values()


# -- one file of each kind, and bad ones -----------------------------------------------------


def test_markdown_code_fences_are_not_headings():
    docs, problems = _one("a.md", "md", b"# Title\n\n```\n# not a heading\n```\n\n## Real\n\ntext\n")
    assert problems == [] and list(docs[0].headings.values()) == ["Title", "Real"]


def test_html_charset_hidden_elements_and_headerlinks():
    page = ('<html><head><meta charset="iso-8859-1"><title>Caf\xe9</title></head><body>'
            '<div class="sphinxsidebar" role="navigation">Sidebar</div>'
            '<h1>Menu<a class="headerlink" href="#x">\xb6</a></h1><p hidden>secret</p>'
            '<p style="display: none">gone</p><p>Cr\xe8me br\xfbl\xe9e</p>'
            '<header><a href="/">Logo</a></header></body></html>').encode("latin-1")
    docs, problems = _one("cafe.html", "html", page)
    assert problems == []
    doc = docs[0]
    assert doc.title == "Café" and doc.text == "Menu\n\nCrème brûlée"
    assert list(doc.headings.values()) == ["Menu"]


def test_records_jsonl_csv_parquet(tmp_path):
    lines = b'{"id": "a1", "title": "First", "text": "Alpha text."}\n\n{"text": "No id here."}\n'
    docs, problems = _one("r.jsonl", "jsonl", lines)
    assert problems == []
    assert [(d.source, d.title, d.file) for d in docs] == [("r.jsonl#a1", "First", "r.jsonl"),
                                                            ("r.jsonl#3", "3", "r.jsonl")]
    docs, _ = _one("r.csv", "csv", b"key,body\nk1,Hello there\nk2,General Kenobi\n", text="body", id="key")
    assert [(d.source, d.text) for d in docs] == [("r.csv#k1", "Hello there"), ("r.csv#k2", "General Kenobi")]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), path)
    docs, _ = _one("r.parquet", "parquet", path.read_bytes())
    assert [d.source for d in docs] == ["r.parquet#1", "r.parquet#2"]


def test_bad_records_are_named_and_skipped():
    raw = (b'{"id": "a", "text": "fine"}\n{broken\n{"id": "a", "text": "dup"}\n'
           b'{"id": "b", "text": ""}\n{"id": "c", "text": 7}\n[1, 2]\n')
    docs, problems = _one("r.jsonl", "jsonl", raw)
    assert [d.source for d in docs] == ["r.jsonl#a"]
    got = {p.where: p.reason for p in problems}
    assert all(p.kind == "record" for p in problems)
    assert "invalid JSON" in got["r.jsonl:2"] and "not a JSON object" in got["r.jsonl:6"]
    assert "duplicate record id" in got["r.jsonl#a"]
    assert "is empty" in got["r.jsonl#b"] and "is not a string (int)" in got["r.jsonl#c"]


def test_csv_row_with_more_fields_than_its_header_is_a_record_problem():
    raw = b"id,text\nr1,first\nr2,second,surplus\nr3,third\n"
    docs, problems = _one("notes.csv", "csv", raw)
    assert [d.source for d in docs] == ["notes.csv#r1", "notes.csv#r3"]
    assert [(p.where, p.kind) for p in problems] == [("notes.csv:3", "record")]
    assert "3 fields, the header has 2" in problems[0].reason
    # Without a text column the ragged row still gives a clear file problem, not a crash.
    docs, problems = _one("table.csv", "csv", b"a,b\n1,2\n3,4,5\n")
    assert docs == [] and "text column 'text' not found" in problems[-1].reason


def test_bad_files_are_problems_not_documents():
    cases = {
        ("bad.txt", "txt", b"caf\xe9 au lait"): "not valid UTF-8 (byte 0xe9 at offset 3)",
        ("empty.md", "md", b"  \n"): "file is empty",
        ("nav.html", "html", b"<html><body><nav>only links</nav><script>x()</script></body></html>"): "no text",
        ("nocol.jsonl", "jsonl", b'{"body": "x"}\n'): "text column 'text' not found; columns are ['body']",
        ("bad.parquet", "parquet", b"not parquet at all"): "cannot read parquet",
        ("odd.html", "html", b"<p>caf\xe9</p>"): "declare its charset",
    }
    for (path, kind, raw), reason in cases.items():
        docs, problems = _one(path, kind, raw)
        assert docs == [] and len(problems) == 1, path
        assert problems[0].where == path and problems[0].kind == "file"
        assert reason in problems[0].reason, (path, problems[0].reason)


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("readable")
    corpus = scan_corpus(str(tmp_path))

    def refuse(self, f):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Corpus, "read", refuse)
    docs, problems = read_file(corpus, corpus.files[0])
    assert docs == [] and str(problems[0]) == "a.txt: cannot read (Permission denied)"


def test_scan_lists_recursively_ignores_other_kinds_and_hidden_paths(tmp_path):
    for rel in ("a.md", "sub/b.txt", "sub/deep/c.HTML", "img.png", "x.js", ".git/config.txt",
                "_sources/a.rst.txt", "genindex-A.html"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# x\n\ntext\n")
    corpus = scan_corpus(str(tmp_path), exclude=("genindex*.html",))
    assert [f.path for f in corpus.files] == ["a.md", "sub/b.txt", "sub/deep/c.HTML"]
    assert corpus.ignored == {".png": 1, ".js": 1, "hidden or excluded": 3}
    single = scan_corpus(str(tmp_path / "sub" / "b.txt"))
    assert [f.path for f in single.files] == ["b.txt"]


def test_scan_refuses_missing_or_unusable_corpus(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        scan_corpus(str(tmp_path / "nope"))
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    with pytest.raises(CorpusError, match=r"no files to index \(found only: .png 1\)"):
        scan_corpus(str(tmp_path))


def test_scan_reads_object_store_uris():
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/docs-test/a.md", b"# A\n\nalpha\n")
    mem.pipe("/docs-test/sub/b.txt", b"beta\n")
    corpus = scan_corpus("memory://docs-test")
    assert [f.path for f in corpus.files] == ["a.md", "sub/b.txt"]
    docs, _ = read_file(corpus, corpus.files[1])
    assert docs[0].text == "beta\n" and docs[0].source == "sub/b.txt"


# -- chunking ----------------------------------------------------------------------------------


def test_chunks_are_stable_exact_spans_within_size(shipped):
    _, docs, _ = shipped
    settings = ChunkSettings(size=120, overlap=24)
    for doc in docs.values():
        first = chunk_document(doc, settings)
        assert [c.id for c in first] == [c.id for c in chunk_document(doc, settings)]
        assert [c.id for c in first] == [f"{doc.source}:{i}" for i in range(len(first))]
        for c in first:
            assert c.text == doc.text[c.start:c.end]
            assert len(TOKEN.findall(c.text)) <= settings.size
        covered = {i for c in first for i in range(c.start, c.end)}
        assert all(i in covered for m in TOKEN.finditer(doc.text) for i in (m.start(),)), doc.source


def test_chunks_break_at_headings_and_overlap_inside_sections():
    body = " ".join(f"w{i}." for i in range(300))
    text = f"# Top\n\n{body}\n\n## Next\n\nshort tail here\n"
    docs, _ = _one("t.md", "md", text.encode())
    chunks = chunk_document(docs[0], ChunkSettings(size=100, overlap=20))
    assert chunks[-1].text.startswith("## Next") and chunks[-1].section == "Next"
    assert chunks[0].section == "Top"
    a, b = chunks[0], chunks[1]
    assert b.start < a.end  # overlap within the section
    assert a.text[-10:] in b.text
    assert chunks[-2].end < chunks[-1].start  # no overlap across the heading


def test_character_chunks_and_invalid_settings():
    docs, _ = _one("t.txt", "txt", ("Sentence number one. " * 200).encode())
    chunks = chunk_document(docs[0], ChunkSettings(unit="chars", size=300, overlap=60))
    assert all(len(c.text) <= 300 for c in chunks) and len(chunks) > 10
    assert all(c.text.endswith(".") for c in chunks[:-1])  # cut at sentence ends
    with pytest.raises(ValueError, match="at most half"):
        ChunkSettings(size=100, overlap=60)
