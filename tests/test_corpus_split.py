"""A large table file read by several tasks (dspy_ray.corpus.split): jsonl byte ranges and parquet row groups give
the rows, ids, per-row errors and messages a whole read gives; file-level problems are said of the whole file."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from itertools import pairwise

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspy_ray.corpus import InputError, InputSpec, discover
from dspy_ray.corpus import split as split_module
from dspy_ray.corpus.rows import file_rows
from dspy_ray.corpus.source import plan_groups
from dspy_ray.corpus.split import count_breaks, numbered_lines, split_file
from pipelines.inputs import load_corpus

FIRE = "火事です 🔥 é"  # 3- and 4-byte characters: some cut lands inside one


def tricky_jsonl() -> bytes:
    """A BOM, CRLF, a lone CR, blank lines, multi-byte and invalid UTF-8, rows with and without ids,
    per-row problems, a nested column, and no newline at the end."""
    out = [b"\xef\xbb\xbf" + json.dumps({"id": "first", "text": "bom row", "n": 0}).encode() + b"\r\n"]
    for i in range(1, 40):
        row = {"text": f"{FIRE} {i}" * (i % 4 + 1), "n": i, "meta": {"k": i}}
        if i % 3 == 0:
            row["id"] = f"r{i}"
        if i % 7 == 0:
            row["text"] = "   "  # a per-row error
        end = [b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n  \r\n"][i % 5]
        out.append(json.dumps(row, ensure_ascii=False).encode() + end)
    out.append(b'{"text": "bad \xff byte", "n": 40, "meta": {"k": 40}}\n\n')
    out.append(json.dumps({"text": "last, no newline", "n": 41, "meta": {"k": 41}}).encode())
    return b"".join(out)


def whole_lines(path) -> list[tuple[int, str]]:
    """Python's own reading: universal newlines, the BOM dropped, bad bytes replaced."""
    with open(path, "rb") as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        return [(n, line.rstrip("\r\n")) for n, line in enumerate(lines, 1)]


def numbered(parts, fs):
    """``parts`` with their line counts before them, counted here (what number_lines does in Ray tasks)."""
    out, before = [], 0
    for part in parts:
        out.append(replace(part, breaks_before=before))
        before += count_breaks(fs, part.file.full, part.start, part.end)
    return out


def rows_of(tables: list[pa.Table]) -> list[dict]:
    rows = [r for t in tables for r in t.to_pylist()]
    names = {k for r in rows for k in r}
    return [{k: r.get(k) for k in sorted(names)} for r in rows]


def by_id(row: dict) -> str:
    return row["id"]


def read_parts(path, spec, size, rows_per_block=5):
    found = discover(spec)
    parts = numbered(split_file(found.files[0], size), found.fs)
    return parts, rows_of([t for p in parts for t in file_rows(p, found.fs, spec, rows_per_block)])


# -- without Ray: the ranges ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 4 << 20])
def test_every_cut_gives_the_lines_and_numbers_of_a_whole_read(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(split_module, "CHUNK", chunk)
    path = tmp_path / "t.jsonl"
    path.write_bytes(tricky_jsonl())
    found = discover(InputSpec(str(path)))
    f, fs = found.files[0], found.fs
    expected = whole_lines(path)
    for size in sorted({1, 2, 3, 5, 8, 13, 61, 97, f.size // 2, f.size - 1}):
        parts = numbered(split_file(f, size), fs)
        got = []
        for part in parts:
            for at, lineno, line in numbered_lines(fs, f.full, part.start, part.breaks_before, part.end):
                if at >= part.end:
                    break
                got.append((lineno, line.decode("utf-8", errors="replace")))
        assert got == expected, size


class CountingFs:
    """A filesystem that counts the bytes its files are asked for."""

    def __init__(self, fs):
        self.fs, self.read = fs, 0

    def open_input_file(self, path):
        return CountingFile(self, self.fs.open_input_file(path))


class CountingFile:
    def __init__(self, owner, inner):
        self.owner, self.inner = owner, inner

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()

    def size(self):
        return self.inner.size()

    def read_at(self, n, offset):
        self.owner.read += n
        return self.inner.read_at(n, offset)


def test_a_range_inside_a_long_line_reads_no_further(tmp_path, monkeypatch):
    monkeypatch.setattr(split_module, "CHUNK", 100)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * 100_000 + b'"}\n{"text": "short"}\n')
    found = discover(InputSpec(str(path)))
    fs = CountingFs(found.fs)
    assert list(split_module.lines_from(fs, found.files[0].full, 5_000, 6_000)) == []
    assert fs.read < 1_300  # not the 95 KB to the line's end
    assert [at for at, _ in split_module.lines_from(fs, found.files[0].full, 5_000)] == [100_013]


def test_jsonl_parts_give_the_rows_of_a_whole_read(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(tricky_jsonl())
    spec = InputSpec(str(path))
    found = discover(spec)
    expected = rows_of(list(file_rows(found.files[0], found.fs, spec, 1000)))
    assert expected[0]["id"] == "first" and expected[1]["id"] == "t.jsonl:2"
    assert any(r["errors"] == ["text is empty"] for r in expected) and "bad \ufffd byte" in expected[-2]["text"]
    for size in (7, 50, 333, found.files[0].size // 3):
        parts, got = read_parts(path, spec, size)
        assert len(parts) > 1 and got == expected, size


def test_plan_cuts_jsonl_and_parquet_but_never_csv(tmp_path):
    for name in ("a.jsonl", "b.csv"):
        (tmp_path / name).write_text("text\n" + "x\n" * 5000)
    pq.write_table(pa.table({"text": [f"y{i}" for i in range(5000)]}), tmp_path / "c.parquet", row_group_size=500)
    for name, cut in (("a.jsonl", True), ("b.csv", False), ("c.parquet", True)):
        found = discover(InputSpec(str(tmp_path / name)))
        groups = plan_groups(found, 8, split_bytes=1000, min_split_bytes=1000)
        assert (len(groups) > 1) is cut, name
        parts = [p for g in groups for p in g]
        assert parts[0].start == 0 and parts[-1].end == found.files[0].size
        assert all(a.end == b.start for a, b in pairwise(parts))
    found = discover(InputSpec(str(tmp_path / "a.jsonl")))  # ~10 KB: 8 tasks, never under the minimum
    assert len(plan_groups(found, 8, split_bytes=1 << 20, min_split_bytes=100)) == 8
    assert len(plan_groups(found, 8, split_bytes=1 << 20, min_split_bytes=4000)) == 3
    assert len(plan_groups(found, 8)) == 1  # the defaults: 64 MiB, at least 8 MiB


def test_parquet_row_groups_numbered_from_the_file_start(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"text": [f"row {i}" if i % 9 else "" for i in range(1000)], "n": list(range(1000))})
    pq.write_table(table, path, row_group_size=64)
    spec = InputSpec(str(path))
    found = discover(spec)
    expected = rows_of(list(file_rows(found.files[0], found.fs, spec, 100)))
    for size in (500, 2000, found.files[0].size // 2):
        parts, got = read_parts(path, spec, size, rows_per_block=100)
        assert len(parts) > 1 and got == expected
    assert [r["id"] for r in got[998:]] == ["t.parquet:999", "t.parquet:1000"]
    empty = pa.table({"text": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="empty.parquet: no rows"):
        load_corpus(InputSpec(str(tmp_path / "empty.parquet")))


# -- file-level facts: of the whole file, never of one range ----------------------------


def test_rows_only_in_one_range_and_file_level_problems(tmp_path):
    blank = "\n" * 400
    only_late = tmp_path / "late.jsonl"
    only_late.write_text(blank + '{"text": "late"}\n')
    only_early = tmp_path / "early.jsonl"
    only_early.write_text('{"text": "early"}\n' + blank)
    for path, line in ((only_late, 401), (only_early, 1)):
        parts, rows = read_parts(path, InputSpec(str(path)), 50)
        assert len(parts) > 5 and [(r["id"], r["text"]) for r in rows] == [(f"{path.name}:{line}", path.stem)]
    cases = [("blank.jsonl", blank, "no rows"),
             ("notext.jsonl", blank + '{"body": "x"}\n' + blank + '{"other": 1}\n', "text column 'text' not found"),
             ("badlate.jsonl", blank + '{"body": "x"}\n' + blank + '{"text": \n', "line 802: invalid JSON")]
    for name, content, problem in cases:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(InputError) as whole_read:
            load_corpus(InputSpec(str(path)))
        with pytest.raises(InputError) as parts_read:
            read_parts(path, InputSpec(str(path)), 50)
        assert problem in str(whole_read.value) and str(parts_read.value) == str(whole_read.value)
    late_text = tmp_path / "latetext.jsonl"  # the first range has rows, none with the text column
    late_text.write_text('{"body": "x"}\n' * 20 + '{"text": "here"}\n')
    spec = InputSpec(str(late_text))
    assert read_parts(late_text, spec, 40)[1] == rows_of([load_corpus(spec)])


# -- on the workers ----------------------------------------------------------------------


def write_big(path, rows=600, bad_at=None, dup_at=None, text="text"):
    """``rows`` jsonl rows with ids; a broken line at ``bad_at``, the id of row 2 again at ``dup_at``."""
    lines = []
    for i in range(1, rows + 1):
        if i == bad_at:
            lines.append('{"id": "broken", "text": ')
        else:
            rid = "c2" if i == dup_at else f"c{i}"
            lines.append(json.dumps({"id": rid, text: f"{FIRE} {i}", "n": i}, ensure_ascii=False))
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def test_workers_read_one_big_file_in_many_tasks(ray_local, tmp_path):
    from dspy_ray.corpus.precheck import precheck
    from dspy_ray.corpus.source import CorpusSource, corpus_dataset

    path = tmp_path / "t.jsonl"
    path.write_bytes(tricky_jsonl() + b"\n" + b"".join(
        json.dumps({"text": f"more {i}", "n": i, "meta": {"k": i}}).encode() + b"\n" for i in range(300)))
    spec = InputSpec(str(path))
    found = discover(spec)
    cut = {"split_bytes": 700, "min_split_bytes": 700}
    source = CorpusSource(found, spec, 16, **cut)
    assert len(source.get_read_tasks(200)) == -(-found.files[0].size // 700)
    assert source.plan(200) is source.plan(8)  # the same ranges: counted once, however often Ray Data asks
    checked = precheck(found, spec, **cut)
    expected = load_corpus(spec)
    assert (checked.rows, checked.rows_with_errors) == (expected.num_rows, 5)
    ds = corpus_dataset(found, spec, rows_per_block=16, types=checked.types, **cut)
    got = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)),
                           promote_options="permissive")
    assert sorted(rows_of([got]), key=by_id) == sorted(rows_of([expected]), key=by_id)

    pq.write_table(pa.table({"text": [f"p{i}" for i in range(900)], "n": list(range(900))}),
                   tmp_path / "t.parquet", row_group_size=50)
    spec = InputSpec(str(tmp_path / "t.parquet"))
    ds = corpus_dataset(discover(spec), spec, rows_per_block=64, split_bytes=1500, min_split_bytes=1500)
    ids = sorted(int(r["id"].rpartition(":")[2]) for r in ds.take_all())
    assert ids == list(range(1, 901))


def test_precheck_and_run_name_the_absolute_line(ray_local, tmp_path):
    from dspy_ray.corpus.precheck import precheck
    from dspy_ray.corpus.source import corpus_dataset, input_error_in

    cut = {"split_bytes": 2000, "min_split_bytes": 2000}
    spec = InputSpec(str(write_big(tmp_path / "bad.jsonl", bad_at=571)))
    with pytest.raises(InputError, match="bad.jsonl line 571: invalid JSON") as whole_read:
        load_corpus(spec)
    with pytest.raises(InputError) as checked:
        precheck(discover(spec), spec, **cut)
    with pytest.raises(Exception) as err:
        corpus_dataset(discover(spec), spec, **cut).take_all()
    assert str(checked.value) == str(whole_read.value) and str(whole_read.value) in str(input_error_in(err.value))
    spec = InputSpec(str(write_big(tmp_path / "dup.jsonl", dup_at=590)))
    with pytest.raises(InputError, match=r"duplicate id 'c2' at dup.jsonl:2 and dup.jsonl:590"):
        precheck(discover(spec), spec, **cut)
    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n" * 5000)
    spec = InputSpec(str(folder))
    with pytest.raises(InputError, match=r"a.jsonl: no rows \(only blank lines\)$"):  # once, not per range
        precheck(discover(spec), spec, **cut)
    (folder / "a.jsonl").unlink()
    pq.write_table(pa.table({"body": [f"b{i}" for i in range(2000)]}), folder / "a.parquet", row_group_size=100)
    with pytest.raises(InputError, match=r"a.parquet: text column 'text' not found.*--text-column$"):
        precheck(discover(spec), spec, **cut)


@pytest.mark.slow
def test_a_run_over_one_split_file_writes_every_row_once(ray_local, tmp_path, monkeypatch):
    """The batch runner, pre-pass and run, over one file cut into ranges (tiny range sizes)."""
    from dspy_ray.endpoints.settings import EndpointSettings
    from dspy_ray.testing.fake_llm import FakeLLM
    from pipelines.runner import run_pipeline
    from tasks import get_task
    from tests.batch_helpers import read_output

    monkeypatch.setattr(split_module, "BYTES_PER_TASK", 3000)
    monkeypatch.setattr(split_module, "MIN_SPLIT_BYTES", 3000)
    spec = InputSpec(str(write_big(tmp_path / "calls.jsonl", rows=300, text="transcript")), text_column="transcript")
    assert len(plan_groups(discover(spec), 64)) > 5
    stages = get_task("triage").stages_for(overrides={"num_actors": 1})[:1]
    with FakeLLM() as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
        result = run_pipeline(spec, str(tmp_path / "out"), stages, settings)
        unchecked = run_pipeline(spec, str(tmp_path / "out2"), stages, settings, precheck_first=False)
    for run, out in ((result, "out"), (unchecked, "out2")):
        assert run.rows_total == 300
        assert sorted(read_output(tmp_path / out).column("id").to_pylist()) == sorted(f"c{i}" for i in range(1, 301))
