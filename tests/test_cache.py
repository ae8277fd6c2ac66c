"""The LM response cache's store: keys, the cacheable rule, both stores on real files, many processes at once."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading

import pydantic
import pytest

from dspy_ray.client.cache import (
    ENTRY_VERSION,
    LocalStore,
    MemoryStore,
    RemoteStore,
    cache_key,
    cacheable,
    close_caches,
    default_directory,
    encode_entry,
    lookup_key,
    open_cache,
)
from dspy_ray.client.cache import store as store_module
from dspy_ray.client.cache.local import DIRECT_THREADS, IO_THREADS

REQUEST = {
    "model": "qwen-7b",
    "base_url": "http://10.0.0.5:8000/v1",
    "api_key": "sk-secret-1",
    "messages": [{"role": "system", "content": "Triage."}, {"role": "user", "content": "Smoke near house 4."}],
    "temperature": 0.0,
    "max_tokens": 256,
}


def answer(text: str, model: str = "qwen-7b") -> dict:
    return {"id": "c1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5}}


def key_of(i: int) -> str:
    return cache_key({**REQUEST, "messages": [{"role": "user", "content": f"row {i}"}]})


@pytest.fixture(autouse=True)
def _fresh_stores():
    yield
    close_caches()


# -- the key ---------------------------------------------------------------------------


class Verdict(pydantic.BaseModel):
    label: str


class OtherVerdict(pydantic.BaseModel):
    label: str
    confidence: float


def test_key_ignores_credentials_order_and_unset_fields():
    key = cache_key(REQUEST)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key({**REQUEST, "api_key": "sk-other", "headers": {"Authorization": "Bearer x"},
                      "extra_headers": {"X-Team": "a"}, "timeout": 3, "num_retries": 9}) == key
    assert cache_key(dict(reversed(list(REQUEST.items())))) == key
    assert cache_key({**REQUEST, "stop": None, "temperature": 0}) == key  # None = unset; 0 == 0.0
    assert cache_key({**REQUEST, "base_url": "HTTP://user:pw@10.0.0.5:8000/v1/"}) == key
    assert cache_key({k: v for k, v in REQUEST.items() if k != "base_url"} | {"api_base": REQUEST["base_url"]}) == key


@pytest.mark.parametrize("change", [
    {"messages": [{"role": "user", "content": "Smoke near house 5."}]},
    {"model": "qwen-14b"},
    {"base_url": "http://10.0.0.6:8000/v1"},
    {"temperature": 0.7},
    {"top_p": 0.9},
    {"max_tokens": 512},
    {"stop": ["\n"]},
    {"seed": 7},
    {"n": 2},
    {"rollout_id": 1},
    {"response_format": {"type": "json_object"}},
    {"response_format": Verdict},
])
def test_key_changes_with_what_decides_the_answer(change):
    assert cache_key({**REQUEST, **change}) != cache_key(REQUEST)


def test_key_tells_schemas_and_rollouts_apart():
    assert cache_key({**REQUEST, "response_format": Verdict}) != cache_key({**REQUEST, "response_format": OtherVerdict})
    assert cache_key({**REQUEST, "response_format": Verdict}) == cache_key({**REQUEST, "response_format": Verdict})
    assert cache_key({**REQUEST, "rollout_id": 1}) != cache_key({**REQUEST, "rollout_id": 2})


def test_key_refuses_values_with_no_stable_form():
    with pytest.raises(TypeError):
        cache_key({**REQUEST, "callback": lambda: None})
    assert lookup_key({**REQUEST, "callback": lambda: None}) is None


def test_cacheable_rules():
    assert cacheable(REQUEST) and cacheable({**REQUEST, "temperature": 0})
    assert not cacheable({**REQUEST, "temperature": 0.7})
    unset = {k: v for k, v in REQUEST.items() if k != "temperature"}
    assert not cacheable(unset)  # the provider's default temperature samples
    assert cacheable({**REQUEST, "temperature": 0.7, "rollout_id": 3})  # a named sample is reproducible
    assert cacheable({**REQUEST, "temperature": 0.7}, allow_sampled=True) and cacheable(unset, allow_sampled=True)
    assert lookup_key({**REQUEST, "temperature": 0.7}) is None
    assert lookup_key(REQUEST) == cache_key(REQUEST)


# -- one store, one process ------------------------------------------------------------


def stores(tmp_path):
    return [LocalStore(tmp_path / "disk"), RemoteStore(f"file://{tmp_path}/files", memory_entries=0)]


def test_round_trip_and_entry_format(tmp_path):
    for store in stores(tmp_path):
        key = key_of(1)
        assert store.get(key) is None
        store.put(key, answer("fire"))
        got = store.get(key)
        assert got == answer("fire")
        got["choices"].clear()  # the caller's copy
        assert store.get(key) == answer("fire")
        assert (store.stats().hits, store.stats().misses, store.stats().puts) == (2, 1, 1)
        store.close()
    entry = json.loads((tmp_path / "files" / key[:2] / f"{key}.json").read_bytes())
    assert entry["version"] == ENTRY_VERSION and entry["key"] == key and entry["model"] == "qwen-7b"
    assert entry["created"] > 0 and entry["response"] == answer("fire")
    assert not [p for p in (tmp_path / "files").rglob(".tmp-*")]


def test_errors_are_not_stored():
    store = MemoryStore()
    store.put(key_of(1), {"error": {"message": "rate limited", "code": 429}})
    store.put(key_of(2), {"choices": [object()]})  # not JSON
    assert store.get(key_of(1)) is None and store.get(key_of(2)) is None
    assert store.stats().refused == 2 and store.stats().puts == 0
    store.put(key_of(3), {**answer("ok"), "error": None})  # a null error field is no error
    assert store.get(key_of(3))["choices"][0]["message"]["content"] == "ok"


def corrupt_local(store: LocalStore, key: str, data: bytes) -> None:
    store._opened().cache.set(key, data)


def corrupt_file(store: RemoteStore, key: str, data: bytes) -> None:
    path = store.path_for(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("bad", [
    b"",
    b"\x00\xffgarbage",
    encode_entry(key_of(1), answer("fire"))[:40],  # half-written
    b"[1, 2]",
    encode_entry(key_of(1), answer("fire")).replace(b'"version":1', b'"version":99'),
    encode_entry(key_of(2), answer("fire")),  # another key's entry
])
def test_a_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path, bad, caplog):
    local, remote = stores(tmp_path)
    key = key_of(1)
    for store, corrupt in ((local, corrupt_local), (remote, corrupt_file)):
        corrupt(store, key, bad)
        with caplog.at_level(logging.DEBUG, logger="dspy_ray.client.cache"):
            assert store.get(key) is None
        assert store.stats().corrupt == 1 and store.stats().errors == 0
        store.put(key, answer("fire"))
        assert store.get(key) == answer("fire")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_size_bound_evicts(tmp_path):
    store = LocalStore(tmp_path / "small", size_limit=256 * 1024)
    for i in range(400):  # ~2.4 KB each: ~1 MB written into a 256 KiB bound
        store.put(key_of(i), answer(f"answer {i} " + "x" * 2000))
    assert store.volume() <= 256 * 1024 + 64 * 1024  # evicted after each write once over
    assert len(store) < 200
    assert store.get(key_of(0)) is None  # the least recently stored went first
    assert store.get(key_of(399)) == answer("answer 399 " + "x" * 2000)


def test_size_bound_holds_for_answers_written_in_batches(tmp_path):
    """The cache writer stores answers many to a transaction; the folder is brought back under its bound after
    each one, not only after single puts."""
    from dspy_ray.client.cache.writer import flush_writes

    store = LocalStore(tmp_path / "batched", size_limit=256 * 1024)
    for i in range(400):
        store.put_later(key_of(i), answer(f"answer {i} " + "x" * 2000))
    flush_writes(30.0)
    assert store.volume() <= 256 * 1024 + 64 * 1024
    assert 0 < len(store) < 200
    assert store.get(key_of(0)) is None
    assert store.get(key_of(399)) == answer("answer 399 " + "x" * 2000)


def _rows(store: LocalStore) -> dict[str, tuple]:
    """The folder's rows as SQLite holds them (a connection of the test's own), and diskcache's own counters."""
    import sqlite3

    with sqlite3.connect(os.path.join(store.location, "cache.db")) as con:
        rows = {key: (raw, size, mode, filename) for key, raw, size, mode, filename in
                con.execute("SELECT key, raw, size, mode, filename FROM Cache")}
        counters = dict(con.execute("SELECT key, value FROM Settings WHERE key IN ('count', 'size')"))
    return rows | {"__counters__": (counters["count"], counters["size"])}


def test_a_batch_written_many_rows_to_a_statement_is_what_set_writes(tmp_path):
    """The writer thread's batches go into SQLite many entries to a statement: the rows are set()'s, diskcache's
    count and size follow them, a corrupt entry is replaced, and an answer too long for the database goes into a
    file of its own as set() puts it."""
    from dspy_ray.client.cache.local import ROWS_PER_STATEMENT
    from dspy_ray.client.cache.writer import flush_writes

    import sqlite3

    if sqlite3.sqlite_version_info < (3, 24):
        pytest.skip("SQLite before 3.24 has no upsert: batches are written one set() at a time")
    store, reference = LocalStore(tmp_path / "batched"), LocalStore(tmp_path / "one-by-one")
    assert store._opened().bulk, "the folder's schema should allow batched writes"
    corrupt_local(store, key_of(0), b"half an entry")
    long_text = "y" * 40_000  # past diskcache's 32 KiB: a file
    texts = {i: (long_text if i == 3 else f"answer {i}") for i in range(2 * ROWS_PER_STATEMENT + 5)}
    for i, text in texts.items():
        store.put_later(key_of(i), answer(text))
        reference.put(key_of(i), answer(text))
    assert flush_writes(30.0)
    for i, text in texts.items():
        assert store.get(key_of(i)) == answer(text)
    assert store.stats().corrupt == 0 and store.stats().errors == 0
    rows, expected = _rows(store), _rows(reference)
    assert rows.pop("__counters__") == (len(texts), sum(r[1] for r in rows.values()))
    expected.pop("__counters__")
    # raw and mode as set() writes them; a row held in the database has size 0, a file's row the file's length.
    # (The two folders' file lengths may differ by a few bytes: an entry carries the time it was written.)
    assert {k: (r[0], r[2]) for k, r in rows.items()} == {k: (r[0], r[2]) for k, r in expected.items()}
    assert {k for k, r in rows.items() if r[3]} == {key_of(3)}  # only the long answer is a file
    for k, (_, size, _, filename) in rows.items():
        assert size == (os.path.getsize(os.path.join(store.location, filename)) if filename else 0), k
    # Written again in a batch, every entry is replaced in place: no row more, the same counters.
    for i in range(5):
        store.put_later(key_of(i), answer(f"again {i}"))
    assert flush_writes(30.0)
    assert [store.get(key_of(i)) for i in range(5)] == [answer(f"again {i}") if i != 3 else answer(long_text)
                                                        for i in range(5)]  # a file entry is left as it was
    rows = _rows(store)
    assert rows.pop("__counters__") == (len(texts), sum(r[1] for r in rows.values()))


def test_a_folder_at_its_bound_is_given_room_at_once(tmp_path, monkeypatch):
    """Past its bound, a folder is brought EVICT_ROOM under it in one go (the oldest entries first), so the
    batches that follow do not each evict again."""
    from dspy_ray.client.cache import local, writer

    monkeypatch.setattr(writer, "LINGER_S", 0.0)
    limit = 2 * 1024 * 1024
    evictions = []
    evict_room = local._evict_room

    def spy(cache, volume, limit):
        evict_room(cache, volume, limit)
        evictions.append(cache.volume())

    monkeypatch.setattr(local, "_evict_room", spy)
    store = LocalStore(tmp_path / "full", size_limit=limit)
    batches = 0
    while batches < 500:  # ~6 MB into a 2 MiB bound, 5 answers of ~2.4 KB a batch
        for i in range(5 * batches, 5 * batches + 5):
            store.put_later(key_of(i), answer(f"answer {i} " + "x" * 2000))
        assert writer.flush_writes(30.0)
        batches += 1
    assert store.volume() <= limit
    assert store.get(key_of(0)) is None and store.get(key_of(5 * batches - 1)) is not None
    # Each eviction made room for several batches (EVICT_ROOM of 2 MiB: ~40 KB, 12 KB a batch).
    assert 0 < len(evictions) < batches / 3
    assert max(evictions) <= limit * (1 - local.EVICT_ROOM) + 16 * 1024
    rows = _rows(store)
    assert rows.pop("__counters__")[0] == len(rows) == len(store)


def test_memory_lru_serves_repeated_hits(tmp_path):
    store = RemoteStore(f"file://{tmp_path}/r", memory_entries=2)
    for i in range(3):
        store.put(key_of(i), answer(str(i)))
    for i in range(3):
        os.remove(store.path_for(key_of(i)))
    assert store.get(key_of(0)) is None  # pushed out of the LRU by the later two
    assert store.get(key_of(2)) == answer("2") and store.stats().memory_hits == 1


# -- failing stores ----------------------------------------------------------------------


def test_an_unwritable_location_is_misses_and_one_warning(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a path through a file fails even for root
    for store in (LocalStore(blocker / "lm"), RemoteStore(f"file://{blocker}/lm")):
        with caplog.at_level(logging.WARNING, logger="dspy_ray.client.cache"):
            caplog.clear()
            for i in range(3):
                store.put(key_of(i), answer("fire"))
                assert store.get(key_of(i)) is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert str(blocker) in warnings[0].getMessage()
        assert store.stats().errors >= 3 and store.stats().puts == 0 and store.stats().misses == 3


def test_a_store_that_comes_back_is_used_again(tmp_path, monkeypatch):
    blocker = tmp_path / "later"
    blocker.write_text("in the way")
    store = LocalStore(blocker)
    store.put(key_of(1), answer("fire"))
    blocker.unlink()
    store.put(key_of(1), answer("fire"))  # not retried at once: an unreachable store must not cost every call
    assert store.stats().errors == 2 and store.stats().puts == 0
    monkeypatch.setattr(store, "_retry_at", 0.0)  # REOPEN_AFTER_S later
    store.put(key_of(1), answer("fire"))
    assert store.get(key_of(1)) == answer("fire") and store_module.REOPEN_AFTER_S > 0


def test_an_unknown_scheme_is_misses_not_an_exception(caplog):
    store = RemoteStore("nosuchscheme://AKIA1:topsecret@bucket/prefix")
    with caplog.at_level(logging.DEBUG, logger="dspy_ray.client.cache"):
        store.put(key_of(1), answer("fire"))
        assert store.get(key_of(1)) is None and store.stats().errors == 2
    assert "topsecret" not in caplog.text + repr(store) and "***@bucket/prefix" in caplog.text


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["off", "OFF", "0", "false", "none", " off "])
def test_lm_cache_off(monkeypatch, setting):
    monkeypatch.setenv("LM_CACHE", setting)
    assert open_cache() is None
    assert open_cache(setting) is None


def test_open_cache_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("LM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LM_CACHE_SIZE_MB", "8")
    default = open_cache()
    assert isinstance(default, LocalStore) and default.location == str(tmp_path / "xdg" / "dspy-ray" / "lm")
    assert default.size_limit == 8 * 2**20 and default_directory() == tmp_path / "xdg" / "dspy-ray" / "lm"
    assert open_cache("") is default and open_cache("on") is default  # one store per setting per process
    here = open_cache(str(tmp_path / "here"))
    assert isinstance(here, LocalStore) and open_cache(str(tmp_path / "here") + "/") is here
    remote = open_cache(f"file://{tmp_path}/shared/")
    assert isinstance(remote, RemoteStore) and open_cache(f"file://{tmp_path}/shared") is remote
    monkeypatch.setenv("LM_CACHE", f"file://{tmp_path}/shared")
    assert open_cache() is remote
    monkeypatch.setenv("LM_CACHE_SIZE_MB", "lots")
    with pytest.raises(ValueError, match="LM_CACHE_SIZE_MB"):
        open_cache(str(tmp_path / "here"))


def test_threads_share_one_store(tmp_path):
    found, errors = [], []

    def worker(t: int) -> None:
        try:
            store = open_cache(str(tmp_path / "shared"))
            found.append(store)
            for i in range(20):
                store.put(key_of(100 * t + i), answer(f"{t}/{i}"))
                assert store.get(key_of(100 * t + i)) == answer(f"{t}/{i}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({id(s) for s in found}) == 1
    assert found[0].stats().puts == 160 and found[0].stats().hits == 160


def open_files(path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # closed meanwhile
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_threads_that_come_and_go_do_not_pile_up_open_files(tmp_path):
    """dspy.Parallel and callers with a thread each: the store's connections stay bounded, whatever the threads.

    Each generation runs more threads at once than may touch the store directly; the rest go through
    the store's own threads, so the open files stay under the bound and do not grow from one generation
    to the next (a direct thread's connection is closed when the thread ends); closing the store closes the rest."""
    store = LocalStore(tmp_path / "lm")
    store.put(key_of(0), answer("warm"))
    db = tmp_path / "lm" / "cache.db"
    bound = DIRECT_THREADS + IO_THREADS + 2  # + the writer thread, + this thread
    start = threading.Barrier(DIRECT_THREADS + 24)

    def reader(t: int) -> None:
        start.wait(timeout=30)  # all alive at once
        store.put(key_of(t), answer(str(t)))
        assert store.get(key_of(t)) == answer(str(t)) and store.get(key_of(0)) == answer("warm")

    counts = []
    for _ in range(6):  # six generations, each with more threads at once than the direct ones
        threads = [threading.Thread(target=reader, args=(t,)) for t in range(1, DIRECT_THREADS + 25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts.append(open_files(db))
    assert max(counts) <= bound, counts  # a pile-up would pass it within a few generations

    store.close()
    assert open_files(db) == 0


def test_settings_built_in_code_follow_lm_cache(monkeypatch, tmp_path):
    """EndpointSettings(cache='') (built in code, not from the environment) uses the process's LM_CACHE."""
    from dspy_ray.client.lm import build_lm
    from dspy_ray.endpoints.settings import EndpointSettings

    monkeypatch.setenv("LM_CACHE", "off")
    assert build_lm(EndpointSettings(base_url="http://127.0.0.1:9/v1", model="m")).cache_store is None
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "here"))
    store = build_lm(EndpointSettings(base_url="http://127.0.0.1:9/v1", model="m")).cache_store
    assert isinstance(store, LocalStore) and store.location == str(tmp_path / "here")


def test_file_uri_remote_round_trip_through_open_cache(tmp_path):
    writer = open_cache(f"file://{tmp_path}/shared")
    writer.put(key_of(7), answer("seven"), model="served-model")
    close_caches()
    reader = open_cache(f"file://{tmp_path}/shared")
    assert reader is not writer and reader.get(key_of(7)) == answer("seven")
    entry = json.loads((tmp_path / "shared" / key_of(7)[:2] / f"{key_of(7)}.json").read_text())
    assert entry["model"] == "served-model"


# -- many processes at once --------------------------------------------------------------

PROCESSES, SHARED, OWN = 6, 60, 40


def _writer(kind: str, location: str, worker: int, start) -> None:
    from dspy_ray.client.cache.writer import flush_writes

    store = LocalStore(location) if kind != "remote" else RemoteStore(location, memory_entries=0)
    put = store.put_later if kind == "batched" else store.put  # batched: the writer thread, many to a statement
    start.wait()
    for i in range(SHARED):  # every process writes these same keys, with the same answer
        put(key_of(i), answer(f"shared {i}"))
        store.get(key_of((i * 7) % SHARED))
    for i in range(OWN):
        put(key_of(1000 * (worker + 1) + i), answer(f"worker {worker} row {i}"))
    assert flush_writes(60.0)
    assert store.stats().errors == 0, store.stats()
    store.close()


@pytest.mark.parametrize("kind", ["local", "batched", "remote"])
def test_many_processes_writing_at_once(tmp_path, kind):
    location = str(tmp_path / "disk") if kind != "remote" else f"file://{tmp_path}/files"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_writer, args=(kind, location, w, start)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    store = LocalStore(location) if kind != "remote" else RemoteStore(location, memory_entries=0)
    for i in range(SHARED):
        assert store.get(key_of(i)) == answer(f"shared {i}")
    for w in range(PROCESSES):
        for i in range(OWN):
            assert store.get(key_of(1000 * (w + 1) + i)) == answer(f"worker {w} row {i}")
    assert store.stats().corrupt == 0 and store.stats().misses == 0
    if kind != "remote":
        assert len(store) == SHARED + PROCESSES * OWN
    else:
        assert not list((tmp_path / "files").rglob(".tmp-*"))
