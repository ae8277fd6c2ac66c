"""Input reading and validation: every bad input is an InputError naming the file, or a per-row error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.inputs import InputError, InputSpec, load_corpus, to_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def errors_by_id(table):
    return dict(zip(table.column("id").to_pylist(), table.column("errors").to_pylist()))


def test_jsonl_with_ids_keeps_every_column(tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"id": 1, "transcript": "fire", "caller": "a"},
                                                  {"id": 2, "transcript": "dog", "caller": "b"}])
    table = load_corpus(InputSpec(str(src), text_column="transcript"))
    assert table.column("id").to_pylist() == ["1", "2"]
    assert table.column("caller").to_pylist() == ["a", "b"]
    assert table.column("errors").to_pylist() == [[], []]


def test_generated_ids_are_stable(tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"transcript": f"call {i}"} for i in range(5)])
    first = load_corpus(InputSpec(str(src), text_column="transcript")).column("id").to_pylist()
    assert first == load_corpus(InputSpec(str(src), text_column="transcript")).column("id").to_pylist()
    assert first[0] == "calls.jsonl:1" and len(set(first)) == 5


def test_csv_parquet_and_folders(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("id,transcript\n007,smoke\n008,fire\n")
    (tmp_path / "csv" / "b.csv").write_text("id,transcript\n009,flood\n")
    table = load_corpus(InputSpec(str(tmp_path / "csv"), text_column="transcript"))
    assert table.column("id").to_pylist() == ["007", "008", "009"]  # leading zeros kept
    pq.write_table(pa.table({"id": ["p1"], "transcript": ["gas leak"]}), tmp_path / "one.parquet")
    assert load_corpus(InputSpec(str(tmp_path / "one.parquet"), text_column="transcript")).column("transcript").to_pylist() == ["gas leak"]


def test_folder_of_txt_documents(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first call")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("second call")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"caf\xe9 on fire")
    table = load_corpus(InputSpec(str(tmp_path / "docs"), text_column="transcript"))
    errs = errors_by_id(table)
    assert set(errs) == {"a.txt", "bad.txt", "sub/b.txt"}
    assert errs["a.txt"] == [] and "not valid UTF-8" in errs["bad.txt"][0]


def test_folder_listing_order_hidden_names_and_linked_folders(tmp_path):
    """Files sort component by component; ``.*`` / ``_*`` names are skipped (not folders); links are not followed."""
    docs = tmp_path / "docs"
    for rel in ("a.txt", "a/b.txt", "a-b/c.txt", "_drafts/d.txt", "a/.e.txt", "a/_f.txt"):
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(rel)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "g.txt").write_text("g")
    (docs / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    table = load_corpus(InputSpec(str(docs), text_column="transcript"))
    assert table.column("id").to_pylist() == ["_drafts/d.txt", "a/b.txt", "a-b/c.txt", "a.txt"]


def test_limit(tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"transcript": f"call {i}"} for i in range(10)])
    assert load_corpus(InputSpec(str(src), text_column="transcript", limit=3)).num_rows == 3


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("calls.jsonl", '{"transcript": "ok"}\n{"transcript": \n', r"calls.jsonl line 2: invalid JSON"),
        ("calls.jsonl", '{"transcript": "ok"}\n[1, 2]\n', r"calls.jsonl line 2: expected a JSON object"),
        ("calls.jsonl", "", r"calls.jsonl: file is empty"),
        ("calls.jsonl", "\n\n", r"calls.jsonl: no rows"),
        ("calls.jsonl", '{"text": "no transcript here"}\n', r"text column 'transcript' not found.*--text-column"),
        ("calls.xml", "<calls/>", r"calls.xml: unknown input format '.xml'"),
        ("calls.csv", "id,text\n1,hello\n", r"calls.csv: text column 'transcript' not found; columns are \['id', 'text'\]"),
    ],
)
def test_file_level_problems_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=expected) as err:
        load_corpus(InputSpec(str(path), text_column="transcript"))
    assert str(path.name) in str(err.value)


def test_missing_path_and_empty_or_mixed_folder(tmp_path):
    with pytest.raises(InputError, match="input not found: .*nope.jsonl"):
        load_corpus(InputSpec(str(tmp_path / "nope.jsonl"), text_column="transcript"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input files found; supported extensions"):
        load_corpus(InputSpec(str(tmp_path / "empty"), text_column="transcript"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("transcript\nx\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"transcript": "y"}\n')
    with pytest.raises(InputError, match="mixes input formats"):
        load_corpus(InputSpec(str(tmp_path / "mixed"), text_column="transcript"))


def test_duplicate_ids_name_both_places(tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"id": "a", "transcript": "x"}, {"id": "b", "transcript": "y"},
                                                  {"id": "a", "transcript": "z"}])
    with pytest.raises(InputError, match=r"duplicate id 'a' at calls.jsonl:1 and calls.jsonl:3"):
        load_corpus(InputSpec(str(src), text_column="transcript"))


def test_per_row_problems_become_errors(tmp_path):
    big = "help " * 40_000  # a 200 KB document
    src = write_jsonl(tmp_path / "calls.jsonl", [
        {"id": "null", "transcript": None},
        {"id": "int", "transcript": 42},
        {"id": "list", "transcript": ["a"]},
        {"id": "blank", "transcript": "   "},
        {"id": "big", "transcript": big},
        {"id": "fine", "transcript": "smoke"},
    ])
    table = load_corpus(InputSpec(str(src), text_column="transcript", max_chars=20_000))
    errs = errors_by_id(table)
    assert errs["null"] == ["transcript is null"]
    assert errs["int"] == ["transcript is not a string (got int)"]
    assert errs["list"] == ["transcript is not a string (got list)"]
    assert errs["blank"] == ["transcript is empty"]
    assert errs["big"] == ["transcript truncated from 200000 to 20000 characters"]
    assert errs["fine"] == []
    texts = dict(zip(table.column("id").to_pylist(), table.column("transcript").to_pylist()))
    assert len(texts["big"]) == 20_000 and texts["int"] == ""
    assert table.num_rows == 6  # nothing dropped


def test_unicode_passes_through_untouched(tmp_path):
    samples = ["🔥 fire at 12 Oak St 🚒", "حريق في المبنى", "שריפה בבניין", "火事です", "e\u0301clair"]
    src = write_jsonl(tmp_path / "calls.jsonl", [{"transcript": t} for t in samples])
    table = load_corpus(InputSpec(str(src), text_column="transcript"))
    assert table.column("transcript").to_pylist() == samples


def test_mixed_types_across_lines_do_not_crash(tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"transcript": "a", "extra": 1}, {"transcript": "b", "extra": "x"},
                                                  {"transcript": "c", "extra": {"nested": True}}])
    table = load_corpus(InputSpec(str(src), text_column="transcript"))
    assert table.column("extra").to_pylist() == ["1", "x", '{"nested": true}']


def test_to_dataset_splits_blocks(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "calls.jsonl", [{"transcript": f"call {i}"} for i in range(500)])
    table = load_corpus(InputSpec(str(src), text_column="transcript"))
    ds = to_dataset(table, rows_per_block=64)
    assert ds.num_blocks() >= 8
    assert sorted(r["id"] for r in ds.take_all()) == sorted(table.column("id").to_pylist())
