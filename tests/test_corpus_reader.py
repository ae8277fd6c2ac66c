"""The shared corpus reader: PDF, Word and e-mail documents, folders of them as batch input, the read on the
Ray Data workers, the validation pre-pass, and the Arrow summary of a run's output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspy_ray.corpus import InputError, InputSpec, discover
from dspy_ray.corpus.documents import parse_bytes
from pipelines.chunking import ChunkSettings, chunk_document
from pipelines.inputs import load_corpus
from tests.doc_fixtures import encrypt_pdf, make_docx, make_eml, make_pdf

CLOSURE = [["ROAD CLOSURES", "", "Quay Street is closed from the bridge to the ferry."],
           ["DETOURS", "", "Use Dock Road; buses stop at the old station."]]


def write_docs(folder):
    """A folder as a new user has one: a PDF, a scan, an encrypted and a broken PDF, Word, mail, Markdown, a PNG."""
    (folder / "mail").mkdir(parents=True)
    pdf = make_pdf(CLOSURE)
    (folder / "closure.pdf").write_bytes(pdf)
    (folder / "scan.pdf").write_bytes(make_pdf([["x"]], image_only=True))
    (folder / "broken.pdf").write_bytes(pdf[: len(pdf) // 3])
    (folder / "guide.docx").write_bytes(make_docx("Hydrant guide", [("Inspection", ["Check every hydrant yearly."]),
                                                                    ("Repair", ["Call the water board."])],
                                                  table=[["Zone", "Crew"], ["North", "Engine 4"]]))
    (folder / "mail" / "dog.eml").write_bytes(make_eml("Loose dog on Pier 3", "",
                                                       html="<p>A <b>large dog</b> is loose on Pier 3.</p>",
                                                       attachments=(("photo.jpg", b"\xff\xd8" * 10),)))
    (folder / "notes.md").write_text("# Noise\n\nMusic after midnight on Elm Street.\n")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n")
    return folder


# -- documents -----------------------------------------------------------------------


def test_pdf_pages_become_sections_that_passages_cite():
    docs, problems = parse_bytes("notices/closure.pdf", "pdf", make_pdf(CLOSURE))
    assert problems == []
    doc = docs[0]
    assert "Quay Street is closed" in doc.text and "Use Dock Road" in doc.text
    assert sorted(doc.headings.values()) == ["page 1", "page 2"]
    chunks = chunk_document(doc, ChunkSettings(size=16, overlap=0))
    dock = next(c for c in chunks if "Dock Road" in c.text)
    assert dock.section == "page 2" and doc.text[dock.start:dock.end] == dock.text
    quay = next(c for c in chunks if "Quay Street" in c.text)
    assert quay.section == "page 1"


@pytest.mark.parametrize(("raw", "reason"), [
    (make_pdf([["x"], ["y"]], image_only=True), "no text layer on any of its 2 pages"),
    (make_pdf(CLOSURE)[:300], "not a readable PDF"),
    (b"%PDF-1.4\n%%EOF\n", "not a readable PDF"),
])
def test_pdfs_without_text_are_named_never_empty(raw, reason):
    docs, problems = parse_bytes("scans/a.pdf", "pdf", raw)
    assert docs == [] and len(problems) == 1
    assert problems[0].where == "scans/a.pdf" and reason in problems[0].reason


def test_encrypted_pdf_is_named():
    pytest.importorskip("pypdf")  # only to make the encrypted file
    docs, problems = parse_bytes("locked.pdf", "pdf", encrypt_pdf(make_pdf(CLOSURE)))
    assert docs == [] and "encrypted" in problems[0].reason and "password" in problems[0].reason


def test_docx_paragraphs_tables_and_heading_sections():
    raw = make_docx("Hydrant guide", [("Inspection", ["Check every hydrant yearly."]), ("Repair", ["Call us."])],
                    table=[["Zone", "Crew"], ["North", "Engine 4"]])
    docs, problems = parse_bytes("guide.docx", "docx", raw)
    doc = docs[0]
    assert problems == [] and doc.title == "Hydrant guide"
    assert list(doc.headings.values()) == ["Hydrant guide", "Inspection", "Repair"]
    assert "Check every hydrant yearly." in doc.text and "North | Engine 4" in doc.text
    start = next(s for s, h in doc.headings.items() if h == "Repair")
    assert doc.text[start:].startswith("Repair")
    assert "not a readable Word file" in parse_bytes("bad.docx", "docx", b"PK\x03\x04 not a zip")[1][0].reason


def test_eml_headers_html_body_and_attachments():
    raw = make_eml("Loose dog on Pier 3", "", html="<p>A <b>large dog</b> is loose.</p><script>x()</script>",
                   attachments=(("photo.jpg", b"12345"),))
    docs, problems = parse_bytes("inbox/dog.eml", "eml", raw)
    doc = docs[0]
    assert problems == [] and doc.title == "Loose dog on Pier 3" and doc.headings == {0: "Loose dog on Pier 3"}
    assert doc.text.startswith("Subject: Loose dog on Pier 3\nFrom: Dispatch <dispatch@example.org>\n")
    assert "Date: Tue, 03 Nov 2026 09:15:00 +0000" in doc.text
    assert "A large dog is loose." in doc.text and "x()" not in doc.text
    assert "Attachments: photo.jpg (application/octet-stream, 5 bytes)" in doc.text
    plain = parse_bytes("a.eml", "eml", make_eml("Hi", "Plain body wins.\n", html="<p>HTML body</p>"))[0][0]
    assert "Plain body wins." in plain.text and "HTML body" not in plain.text
    assert parse_bytes("e.eml", "eml", make_eml("Empty", ""))[1][0].reason == "e-mail has no body text and no attachment"


# -- a folder of documents as batch input ---------------------------------------------


def test_folder_of_documents_one_row_each_every_file_accounted_for(tmp_path):
    folder = write_docs(tmp_path / "inbox")
    found = discover(InputSpec(str(folder)))
    assert found.format == "documents" and found.unsupported == ["logo.png"]
    table = load_corpus(InputSpec(str(folder), text_column="transcript"))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"broken.pdf", "closure.pdf", "guide.docx", "mail/dog.eml", "notes.md", "scan.pdf"}
    assert "Quay Street is closed" in rows["closure.pdf"]["transcript"] and rows["closure.pdf"]["errors"] == []
    assert "large dog" in rows["mail/dog.eml"]["transcript"]
    assert "Check every hydrant yearly." in rows["guide.docx"]["transcript"]
    assert rows["scan.pdf"]["transcript"] == "" and "no text layer" in rows["scan.pdf"]["errors"][0]
    assert rows["broken.pdf"]["errors"] and "not a readable PDF" in rows["broken.pdf"]["errors"][0]


def test_table_formats_do_not_mix_with_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.pdf").write_bytes(make_pdf([["y"]]))
    with pytest.raises(InputError, match="mixes input formats"):
        discover(InputSpec(str(tmp_path)))


# -- on the workers -------------------------------------------------------------------


def test_dataset_on_the_workers_reads_the_same_rows(ray_local, tmp_path):
    from dspy_ray.corpus.source import corpus_dataset

    (tmp_path / "calls").mkdir()
    for part in range(3):
        (tmp_path / "calls" / f"part-{part}.jsonl").write_text("".join(
            json.dumps({"transcript": f"call {part}-{i}", "n": i}) + "\n" for i in range(50)))
    spec = InputSpec(str(tmp_path / "calls"), text_column="transcript")
    expected = load_corpus(spec)
    ds = corpus_dataset(discover(spec), spec, rows_per_block=16)
    got = pa.Table.from_pylist(ds.take_all())
    assert sorted(got.column("id").to_pylist()) == sorted(expected.column("id").to_pylist())
    assert got.num_rows == 150 and "part-2.jsonl:50" in set(got.column("id").to_pylist())
    docs = InputSpec(str(write_docs(tmp_path / "inbox")), text_column="transcript")
    rows = {r["id"]: r for r in corpus_dataset(discover(docs), docs, rows_per_block=2).take_all()}
    assert len(rows) == 6 and "no text layer" in rows["scan.pdf"]["errors"][0]


@pytest.mark.parametrize("bucket_bytes", [512 << 20, 16])  # one bucket of ids, or several counted apart
def test_precheck_names_file_and_line_before_any_lm_call(ray_local, tmp_path, monkeypatch, bucket_bytes):
    from dspy_ray.corpus import precheck as module
    from dspy_ray.corpus.precheck import precheck

    monkeypatch.setattr(module, "BYTES_PER_BUCKET", bucket_bytes)

    folder = tmp_path / "calls"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"id": "x1", "transcript": "smoke"}\n{"id": "x2", "transcript": "  "}\n')
    (folder / "b.jsonl").write_text('{"id": "y1", "transcript": "dog"}\n\n{"id": "x1", "transcript": "again"}\n')
    spec = InputSpec(str(folder), text_column="transcript")
    with pytest.raises(InputError, match=r"duplicate id 'x1' at a.jsonl:1 and b.jsonl:3"):
        precheck(discover(spec), spec)
    (folder / "b.jsonl").write_text('{"id": "y1", "transcript": "dog"}\n{"id": "y2", "transcript": \n')
    with pytest.raises(InputError, match=r"b.jsonl line 2: invalid JSON"):
        precheck(discover(spec), spec)
    (folder / "b.jsonl").write_text('{"id": "y1", "transcript": "dog"}\n')
    checked = precheck(discover(spec), spec)
    assert (checked.rows, checked.rows_with_errors) == (3, 1)
    docs = InputSpec(str(write_docs(tmp_path / "inbox")), text_column="transcript")
    checked = precheck(discover(docs), docs)
    assert checked.rows == 6 and checked.unreadable_count == 2
    assert any(line.startswith("scan.pdf: no text layer") for line in checked.unreadable)


def test_a_column_whose_type_changes_between_files_gets_one_type(ray_local, tmp_path):
    """The pre-pass finds each column's type over the corpus; every block is read with it, so the write works."""
    from dspy_ray.corpus.precheck import precheck
    from dspy_ray.corpus.source import corpus_dataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}", "n": i, "x": i}) + "\n"
                                                     for i in range(4)))
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"text": f"b{i}", "n": i + 0.5, "x": f"s{i}",
                                                                 "more": True}) + "\n" for i in range(4)))
    spec = InputSpec(str(tmp_path / "in"))
    checked = precheck(discover(spec), spec)
    assert checked.types == {"n": "double", "x": "string", "more": "bool"}
    ds = corpus_dataset(discover(spec), spec, rows_per_block=3, types=checked.types)
    ds.map_batches(lambda t: t, batch_format="pyarrow", batch_size=8).write_parquet(str(tmp_path / "out"))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows["a.jsonl:2"]["x"] == "1" and rows["b.jsonl:2"]["x"] == "s1" and rows["a.jsonl:1"]["n"] == 0.0
    assert rows["a.jsonl:1"]["more"] is None and rows["b.jsonl:1"]["more"] is True
    local = load_corpus(spec)
    assert local.schema.field("x").type == pa.string() and local.num_rows == 8


# -- the summary ----------------------------------------------------------------------


def test_file_summary_by_arrow_compute(tmp_path):
    from dspy_ray.util.fs import filesystem_for
    from pipelines.runner import file_summary, summarize

    usage = [{"triage": {"calls": 2, "retries": 1, "prompt_tokens": 10, "completion_tokens": 3, "cost_usd": None,
                         "cached": 0}},
             {"triage": {"calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None,
                         "cached": 1}},
             {"triage": {"calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None,
                         "cached": 0}}]
    table = pa.table({"id": ["a", "b", "c"], "priority": ["urgent", None, "urgent"],
                      "errors": [[], ["bad"], []], "lm_usage": usage})
    (tmp_path / "out").mkdir()
    pq.write_table(table, tmp_path / "out" / "new.parquet")
    pq.write_table(table, tmp_path / "out" / "old.parquet")
    fs, _ = filesystem_for(str(tmp_path))
    found = file_summary(str(tmp_path / "out" / "new.parquet"), fs, ("priority",))
    assert found["rows"] == 3 and found["with_errors"] == 1
    assert found["labels"] == {"priority": {"urgent": 2, "null": 1}}
    assert found["usage"]["triage"] == {"calls": 2, "retries": 1, "prompt_tokens": 10, "completion_tokens": 3,
                                        "cost_usd": None, "cached": 1, "rows": 2}
    result = summarize(str(tmp_path / "out"), 3, 1.0, ("priority",), before=(str(tmp_path / "out" / "old.parquet"),))
    assert (result.rows_total, result.rows_this_run, result.rows_with_errors) == (6, 3, 2)
    assert result.label_counts == {"priority": {"urgent": 4, "null": 2}}
    assert result.usage["triage"]["calls"] == 2 and result.usage["triage"]["rows"] == 2


# -- the run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_file_stops_the_run_before_any_lm_call_or_at_the_worker_without_precheck(ray_local, tmp_path):
    from dspy_ray.endpoints.settings import EndpointSettings
    from dspy_ray.testing.fake_llm import FakeLLM
    from pipelines.runner import run_pipeline
    from tasks import get_task

    folder = tmp_path / "calls"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"a{i}", "transcript": f"fire {i}"}) + "\n"
                                            for i in range(5)))
    (folder / "b.jsonl").write_text('{"id": "b1", "transcript": "dog"}\n{"id": "b2", "transcript": \n')
    stages = get_task("triage").stages_for(overrides={"num_actors": 1})[:1]
    spec = InputSpec(str(folder), text_column="transcript")
    with FakeLLM() as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
        with pytest.raises(InputError, match=r"b.jsonl line 2: invalid JSON"):
            run_pipeline(spec, str(tmp_path / "out"), stages, settings)
        assert fake.stats()["requests"] == 0
        with pytest.raises(InputError, match=r"b.jsonl line 2: invalid JSON") as err:
            run_pipeline(spec, str(tmp_path / "out2"), stages, settings, precheck_first=False)
        assert "Traceback" not in str(err.value)
        (folder / "b.jsonl").write_text('{"id": "b1", "transcript": "dog"}\n')
        result = run_pipeline(spec, str(tmp_path / "out3"), stages, settings, precheck_first=False)
    assert result.rows_total == 6 and result.rows_this_run == 6
