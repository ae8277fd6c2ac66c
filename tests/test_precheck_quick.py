"""The pre-pass's quick jsonl check (dspy_ray.corpus.quickcheck) gives what the line-by-line read gives: the same
rows, rows with problems, column types, given ids and their places, for whole files and byte-range parts, or
it steps aside (None) and the line-by-line read names the problem."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pytest

from dspy_ray.corpus import InputSpec, discover
from dspy_ray.corpus import precheck as precheck_module
from dspy_ray.corpus.precheck import check_rows
from dspy_ray.corpus.quickcheck import jsonl_check
from dspy_ray.corpus.split import count_breaks, split_file, whole

SPEC = InputSpec("x", text_column="text", max_chars=40)


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in rows)


def mixed_rows(n: int = 60) -> list[dict]:
    """Given, missing, null and int-looking ids; blank, Python-only-blank, null, absent, long and multi-byte texts;
    nested, list, date-like, bool, float-after-int and all-null columns."""
    rows = []
    for i in range(n):
        row: dict = {"text": f"call {i}: smoke on 3rd floor 火事 🔥"}
        if i % 4:
            row["id"] = f"r{i}"
        if i % 9 == 0:
            row["id"] = None
        row["text"] = {0: row["text"], 1: "   ", 2: "\x1c\u3000", 3: None, 4: "x" * 41, 5: "é" * 40}.get(i % 11,
                                                                                                     row["text"])
        if i % 13 == 6:
            del row["text"]
        row.update(meta={"k": i}, tags=[i, i + 1], day="2024-01-0%d" % (i % 9 + 1), ok=bool(i % 2),
                   score=i if i < 30 else i + 0.5, nothing=None)
        rows.append(row)
    rows[7]["id"] = "f.jsonl:8"  # an id equal to its own place counts as generated, as the line reader counts it
    return rows


CASES = {
    "mixed": lines(*mixed_rows()),
    "int ids": lines(*({"id": i, "text": f"t{i}"} for i in range(50))),
    "no ids": lines(*({"text": f"t{i}", "n": i} for i in range(50))),
    "no newline at the end": lines(*({"id": f"a{i}", "text": "t"} for i in range(30)))[:-1],
    "duplicate ids": lines(*({"id": f"a{i % 7}", "text": "t"} for i in range(30))),
    # the quick check steps aside for these; the figures must still be the line reader's
    "blank lines": lines({"id": "a", "text": "t"}, b"", b"   ", {"id": "b", "text": "u"}),
    "crlf": lines({"id": "a", "text": "t"}).replace(b"\n", b"\r\n") * 3,
    "bom": b"\xef\xbb\xbf" + lines({"id": "a", "text": "t"}, {"id": "b", "text": "u"}),
    "broken line": lines({"id": "a", "text": "t"}, b'{"id": "b", "text": ', {"id": "c", "text": "u"}),
    "not an object": lines({"id": "a", "text": "t"}, b"[1, 2]"),
    "no text column": lines({"id": "a", "body": "t"}, {"id": "b", "body": "u"}),
    "text column only later": lines(*({"id": f"a{i}", "body": "t"} for i in range(20)), {"id": "z", "text": "u"}),
    "mixed id types": lines({"id": "a", "text": "t"}, {"id": 2, "text": "u"}),
    "float ids": lines({"id": 1.5, "text": "t"}, {"id": 2.0, "text": "u"}),
    "int text": lines({"id": "a", "text": 5}, {"id": "b", "text": 6}),
    "date-like texts": lines({"id": "a", "text": "2024-01-01"}, {"id": "b", "text": "2024-01-02"}),
    "invalid utf-8": lines({"id": "a", "text": "t"}, b'{"id": "b", "text": "bad \xff byte"}'),
    "given errors column": lines({"id": "a", "text": "t", "errors": ["upstream"]}, {"id": "b", "text": "u"}),
    "duplicate keys": lines(b'{"id": "a", "text": "first", "text": ""}', {"id": "b", "text": "u"}),
    "NaN": lines(b'{"id": "a", "text": "t", "x": NaN}', {"id": "b", "text": "u", "x": 1.5}),
    "two objects on a line": lines(b'{"id": "a", "text": "t"} {"id": "b", "text": "u"}', {"id": "c", "text": "v"}),
}


def figures(parts, found, spec, quick: bool, monkeypatch) -> list[tuple]:
    """check_rows' summary rows and id rows, in order, with or without the quick check."""
    with monkeypatch.context() as m:
        if not quick:
            m.setattr(precheck_module, "jsonl_check", lambda *a: None)
        tables = list(check_rows(parts, "jsonl", found.fs, spec, 7))
    out = []
    for t in tables:
        for r in t.to_pylist():
            r["types"] = json.loads(r["types"]) if r["types"] else None
            out.append(tuple(sorted(r.items())))
    summaries = [r for r in out if dict(r)["id"] is None]
    ids = sorted(r for r in out if dict(r)["id"] is not None)
    return summaries + ids


def numbered(parts, found):
    """Each part with the line breaks before it, as number_lines gives them (counted here without Ray)."""
    done = []
    for p in parts:
        before = sum(count_breaks(found.fs, p.file.full, q.start, q.end) for q in parts if q.index < p.index)
        done.append(replace(p, breaks_before=before))
    return done


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cut", [None, 23, 64, 301])
def test_quick_check_gives_the_line_readers_figures(case, cut, tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    path.write_bytes(CASES[case])
    spec = replace(SPEC, path=str(path))
    found = discover(spec)
    f = found.files[0]
    parts = [whole(f)] if cut is None else numbered(split_file(f, cut), found)
    assert figures(parts, found, spec, True, monkeypatch) == figures(parts, found, spec, False, monkeypatch)


@pytest.mark.parametrize("case", ["mixed", "int ids", "no ids", "no newline at the end", "duplicate ids"])
def test_quick_check_takes_clean_files_itself(case, tmp_path):
    """The cases above agree because the quick check answered, not because it stepped aside."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(CASES[case])
    found = discover(replace(SPEC, path=str(path)))
    checked = jsonl_check(whole(found.files[0]), found.fs, replace(SPEC, path=str(path)))
    assert checked is not None and checked.rows == CASES[case].count(b"\n") + (case == "no newline at the end")


@pytest.mark.parametrize("case", ["blank lines", "crlf", "bom", "broken line", "no text column", "float ids",
                                  "int text", "date-like texts", "given errors column", "two objects on a line"])
def test_quick_check_steps_aside_where_it_could_differ(case, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(CASES[case])
    found = discover(replace(SPEC, path=str(path)))
    assert jsonl_check(whole(found.files[0]), found.fs, replace(SPEC, path=str(path))) is None


def test_mixed_case_counts_its_problem_rows(tmp_path):
    """Independently of the line reader: null, absent, blank (Python's idea of blank) and over-long texts."""
    rows = mixed_rows()
    path = tmp_path / "f.jsonl"
    path.write_bytes(lines(*rows))
    found = discover(replace(SPEC, path=str(path)))
    checked = jsonl_check(whole(found.files[0]), found.fs, replace(SPEC, path=str(path)))
    expect = sum(1 for r in rows if not isinstance(r.get("text"), str) or not r["text"].strip() or len(r["text"]) > 40)
    assert checked.with_errors == expect > 0
    assert checked.types["meta"] == checked.types["tags"] == checked.types["day"] == "string"
    assert (checked.types["ok"], checked.types["score"], checked.types["nothing"]) == ("bool", "double", "null")
    assert "f.jsonl:8" not in checked.where.to_pylist() and pa.types.is_string(checked.ids.type)
