"""The LM response cache's stores side by side: hit latency, miss+put cost, CPU per call, 8 writers at once.

    python benchmarks/lm_cache.py [--entries 1000] [--writers 8]

Three stores on this machine's disk, each in a fresh temporary folder:

* ``diskcache LRS`` - :class:`LocalStore` as :func:`open_cache` builds it by default (SQLite,
  evicting the least recently *stored*: a hit only reads);
* ``diskcache LRU`` - the same, evicting the least recently *used* (every hit writes its access time);
* ``JSON files`` - :class:`RemoteStore` on a ``file://`` URI, one file per entry, no SQLite (and no LRU
  in front, so every hit reads its file).

Per store: ``--entries`` miss+put calls (a get that misses, then the put: what a first run pays
on top of the LM call), 2x as many hits on random stored keys (what a re-run pays instead of
the LM call), then ``--writers`` processes putting new entries at once, and as many reading.
Latencies are per call in microseconds (median and p99), CPU is this process's CPU time per call.
The table goes to stdout and ``benchmarks/results/lm_cache.txt``; the last lines say which store
the numbers favour as the default and whether that is the one :func:`open_cache` uses.

    python benchmarks/lm_cache.py --misses [--miss-seconds 8] [--concurrency 128]

The cost of the cache when it never helps: ``--concurrency`` threads call the LM (``build_lm``, the
lean path) against a fake endpoint (latency 0.25 s, so C/L = 4 C calls/s), every call a new
request, so every call misses and is stored.  Side by side, interleaved (off, on, inline, and
back): the cache **off**; **on** as shipped (the answer is written by the process's cache writer
thread, :mod:`dspy_ray.client.cache.writer`); and **inline** (the same store written on the
caller's thread, before the answer is returned: what a put on the hot path costs).  Printed:
answered calls/s of each and the ratios to off (the goal for "on": >= 0.95).

    python benchmarks/lm_cache.py --writes [--write-entries 10000]

What the cache writer thread pays for each answer it stores, in CPU microseconds of that thread,
old way and new side by side: **one by one** (diskcache's ``set()`` per entry, and its ``cull()``
at the bound) and **batched** (:class:`LocalStore` as shipped: many entries to an INSERT, and an
eviction that makes room for several batches).  Four conditions: a folder below its bound or at it
(every batch then evicts), and the process idle or with a thread that keeps the GIL busy (a stage
actor's event loop under load: each time SQLite lets go of the GIL, the writer waits behind it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP

from dspy_ray.client.cache import LocalStore, RemoteStore, cache_key  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lm_cache.txt"
PER_WRITER = 250


def request(i: int) -> dict:
    return {"model": "qwen-7b", "base_url": "http://10.0.0.5:8000/v1", "api_key": "sk-x", "temperature": 0,
            "messages": [{"role": "system", "content": "Triage the call. " * 20},
                         {"role": "user", "content": f"Caller {i} reports smoke near house {i}."}]}


def response(i: int) -> dict:  # a typical chat completion: ~1.3 KB of JSON
    text = '{"reasoning": "' + f"Smoke near a house is a possible structure fire, call {i}. " * 12 + '", "label": "fire"}'
    return {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1767225600, "model": "qwen-7b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 412, "completion_tokens": 96, "total_tokens": 508}}


def make_store(kind: str, location: str):
    if kind == "files":
        return RemoteStore(location, memory_entries=0)
    return LocalStore(location, eviction_policy="least-recently-used" if kind == "lru" else "least-recently-stored")


def timed(calls) -> tuple[list[float], float]:
    """(latency of each call in µs, CPU µs per call)."""
    latencies, cpu = [], time.process_time()
    for call in calls:
        t = time.perf_counter_ns()
        call()
        latencies.append((time.perf_counter_ns() - t) / 1e3)
    return latencies, (time.process_time() - cpu) * 1e6 / max(len(latencies), 1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _worker(kind: str, location: str, keys: list[str], mode: str, start, spans) -> None:
    store = make_store(kind, location)
    store.get(keys[0])  # open the store (SQLite connection, folder) before the clock starts
    values = [response(i) for i in range(len(keys))]
    start.wait()
    began = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of the machine
    for key, value in zip(keys, values):
        if mode == "put":
            store.put(key, value)
        elif store.get(key) is None:
            raise SystemExit(f"miss on {key}")
    spans.put((began, time.perf_counter()))
    if store.stats().errors:
        raise SystemExit(f"{store.stats()}")
    store.close()


def parallel(kind: str, location: str, key_lists: list[list[str]], mode: str) -> float:
    """Calls per second of ``len(key_lists)`` processes running at once (puts or gets), from the first
    call of any to the last call of all (process start and exit are not counted)."""
    ctx = multiprocessing.get_context("fork")
    start, spans = ctx.Barrier(len(key_lists)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, location, keys, mode, start, spans)) for keys in key_lists]
    for p in procs:
        p.start()
    got = [spans.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a {mode} worker failed on {kind}")
    return sum(map(len, key_lists)) / (max(end for _, end in got) - min(began for began, _ in got))


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def measure(kind: str, folder: Path, keys: list[str], writers: int) -> dict:
    location = f"file://{folder}" if kind == "files" else str(folder)
    store = make_store(kind, location)
    responses = [response(i) for i in range(len(keys))]
    store.get("0" * 64)  # open (create the SQLite file) outside the clock

    def miss_put(i):
        return lambda: store.get(keys[i]) is None and store.put(keys[i], responses[i])

    miss, miss_cpu = timed([miss_put(i) for i in range(len(keys))])
    rng = random.Random(0)
    hit, hit_cpu = timed([lambda k=rng.choice(keys): store.get(k) for _ in range(2 * len(keys))])
    assert store.stats().hits == 2 * len(keys) and store.stats().errors == 0, store.stats()
    store.close()  # SQLite folds its write-ahead log into the database on the last close
    bytes_per_entry = disk_bytes(folder) / len(keys)
    # Writers: new keys, a fifth of them shared by all (two actors asking the same question at once).
    new = [[cache_key(request(10**6 * (w + 1) + i)) if i % 5 else cache_key(request(10**5 + i))
            for i in range(PER_WRITER)] for w in range(writers)]
    puts_per_s = parallel(kind, location, new, "put")
    gets_per_s = parallel(kind, location, [rng.sample(keys, PER_WRITER * 2) for _ in range(writers)], "get")
    return {"hit_p50": pct(hit, 0.5), "hit_p99": pct(hit, 0.99), "hit_cpu": hit_cpu,
            "miss_p50": pct(miss, 0.5), "miss_p99": pct(miss, 0.99), "miss_cpu": miss_cpu,
            "puts_per_s": puts_per_s, "gets_per_s": gets_per_s, "bytes_per_entry": bytes_per_entry}


ROWS = [("hit latency p50 (µs)", "hit_p50", "{:.0f}"), ("hit latency p99 (µs)", "hit_p99", "{:.0f}"),
        ("hit CPU per call (µs)", "hit_cpu", "{:.0f}"),
        ("miss+put p50 (µs)", "miss_p50", "{:.0f}"), ("miss+put p99 (µs)", "miss_p99", "{:.0f}"),
        ("miss+put CPU per call (µs)", "miss_cpu", "{:.0f}"),
        ("{w} processes putting at once (puts/s)", "puts_per_s", "{:.0f}"),
        ("{w} processes hitting at once (gets/s)", "gets_per_s", "{:.0f}"),
        ("disk per entry (bytes)", "bytes_per_entry", "{:.0f}")]
NAMES = {"lrs": "diskcache LRS", "lru": "diskcache LRU", "files": "JSON files"}


def table(results: dict[str, dict], writers: int, key_us: float, entries: int, rounds: int) -> str:
    width = max(len(label.format(w=writers)) for label, _, _ in ROWS) + 2
    lines = [f"LM cache stores: {entries} entries of ~1.3 KB, median of {rounds} rounds, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d')}",
             "".ljust(width) + "".join(NAMES[k].rjust(16) for k in results)]
    for label, field, fmt in ROWS:
        lines.append(label.format(w=writers).ljust(width) + "".join(fmt.format(r[field]).rjust(16) for r in results.values()))
    lines.append(f"cache_key() of a request: {key_us:.1f} µs")
    return "\n".join(lines)


MEASURES = [("hit p50", "hit_p50", -1), ("hit CPU", "hit_cpu", -1), ("hits/s, {w} processes", "gets_per_s", 1),
            ("miss+put p50", "miss_p50", -1), ("miss+put CPU", "miss_cpu", -1),
            ("puts/s, {w} processes", "puts_per_s", 1), ("disk per entry", "bytes_per_entry", -1)]
TIE = 1.25  # closer than this is noise on a shared machine


def verdict(results: dict[str, dict], writers: int) -> str:
    """Which store the numbers favour as the local default: clear wins (> 1.25x) counted, ties named as ties."""
    db, files = results["lrs"], results["files"]
    wins: dict[str, list[str]] = {"lrs": [], "files": [], "tie": []}
    for label, field, sign in MEASURES:
        ratio = (db[field] / files[field]) ** sign if files[field] and db[field] else 1.0
        winner = "lrs" if ratio > TIE else "files" if ratio < 1 / TIE else "tie"
        factor = max(ratio, 1 / ratio)
        wins[winner].append(f"{label.format(w=writers)} {db[field]:.0f} vs {files[field]:.0f}"
                            + (f" ({factor:.1f}x)" if winner != "tie" else ""))
    favoured = "lrs" if len(wins["lrs"]) >= len(wins["files"]) else "files"  # a tie goes to the bounded store
    lines = [f"diskcache LRS better: {'; '.join(wins['lrs']) or '-'}",
             f"JSON files better:    {'; '.join(wins['files']) or '-'}",
             f"within {TIE}x (a tie): {'; '.join(wins['tie']) or '-'}",
             f"default: {NAMES[favoured]} - {'it' if favoured == 'lrs' else 'diskcache'} also bounds its size and "
             f"evicts (LM_CACHE_SIZE_MB); a folder of files cannot without listing it.",
             f"open_cache() uses diskcache LRS: {'the numbers agree' if favoured == 'lrs' else 'THE NUMBERS DISAGREE'}.",
             f"LRU eviction would cost {results['lru']['hit_p50'] / db['hit_p50']:.1f}x the hit latency "
             f"(a write per hit), so eviction is by time stored.",
             "JSON files remain the store for a shared filesystem or a bucket (SQLite's locks fail over NFS), by URI.",
             "Every number here is far below one LM call (~100 ms-10 s): either store makes a hit ~free."]
    return "\n".join(lines)


def miss_throughput(seconds: float, concurrency: int) -> None:
    """Calls/s at ``concurrency`` with the cache off, on (background writes) and inline, every call a miss."""
    import threading

    from dspy_ray.client.cache.store import GuardedStore
    from dspy_ray.client.lm import build_lm
    from dspy_ray.endpoints.settings import EndpointSettings
    from dspy_ray.testing.fake_llm import FakeLLM

    folder = Path(tempfile.mkdtemp(prefix="lm-cache-miss-"))
    shipped = GuardedStore.put_later

    def inline(store, key, value, *, model=None):  # the put on the caller's thread, before it returns
        store.put(key, value, model=model)

    def run(fake, variant: str, round_: int) -> float:
        GuardedStore.put_later = inline if variant == "inline" else shipped
        cache = "off" if variant == "off" else str(folder / f"{variant}-{round_}")
        lm = build_lm(EndpointSettings(base_url=fake.base_url, model="fake-model", max_in_flight=concurrency,
                                       adaptive=False, cache=cache))
        stop, counts, lock = time.monotonic() + seconds, [0], threading.Lock()

        def work(i: int) -> None:
            n = 0
            while time.monotonic() < stop:
                lm(messages=[{"role": "user", "content": f"{variant} {round_} caller {i} call {n}: smoke at house {n}"}])
                n += 1
            with lock:
                counts[0] += n

        threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return counts[0] / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"off": [], "on": [], "inline": []}
    try:
        with FakeLLM(latency=0.25) as fake:
            run(fake, "off", -1)  # warm-up: connections, imports
            for r, order in enumerate((("off", "on", "inline"), ("inline", "on", "off"))):
                for variant in order:
                    rates[variant].append(run(fake, variant, r))
    finally:
        GuardedStore.put_later = shipped
        shutil.rmtree(folder, ignore_errors=True)
    off = statistics.mean(rates["off"])
    print(f"every call a miss, {concurrency} in flight, endpoint C/L = {concurrency / 0.25:.0f} calls/s")
    for variant, values in rates.items():
        print(f"  cache {variant:<6} {statistics.mean(values):7.1f} calls/s  ({', '.join(f'{v:.0f}' for v in values)})"
              f"  ratio to off {statistics.mean(values) / off:.3f}")
    print(f"throughput with the cache on, every call a miss: {statistics.mean(rates['on']) / off:.1%} of off "
          f"(goal >= 95%)")


def write_cost(entries: int, rounds: int) -> None:
    """``--writes``: the writer thread's CPU per stored entry, one by one vs batched (see the docstring)."""
    import threading

    from dspy_ray.client.cache import local
    from dspy_ray.client.cache.store import encode_entry

    batch, limit = 250, 32 * 2**20  # what the writer gathers in its linger at ~2,500 misses/s; a bound quick to fill
    data = [(key, encode_entry(key, response(i))) for i, key in
            enumerate(cache_key(request(i)) for i in range(entries + 60_000))]
    cells: dict[tuple[str, bool, bool], list[float]] = {}
    base = Path(tempfile.mkdtemp(prefix="lm-cache-writes-"))
    try:
        for r in range(rounds):
            for at_bound in (False, True):
                for busy in (False, True):
                    for bulk in (False, True):
                        store = LocalStore(base / f"{r}-{at_bound}-{busy}-{bulk}", size_limit=limit)
                        handle, start, filled = store._opened(), 0, 0
                        while at_bound and filled < 1.2 * limit:  # past the bound, the fast way, not timed
                            chunk = data[start:start + 5000]
                            local._set_many(handle.cache, chunk, True)
                            filled += sum(len(v) for _, v in chunk)
                            start += len(chunk)
                        stop = threading.Event()

                        def spin() -> None:  # a thread that holds the GIL whenever it can
                            n = 0
                            while not stop.is_set():
                                n += sum(range(200))

                        spinner = threading.Thread(target=spin, daemon=True)
                        if busy:
                            spinner.start()
                        cpu = time.thread_time()
                        for i in range(start, start + entries, batch):
                            local._set_many(handle.cache, data[i:i + batch], bulk)
                        cells.setdefault((("below", "at")[at_bound], busy, bulk), []).append(
                            (time.thread_time() - cpu) / entries * 1e6)
                        stop.set()
                        if busy:
                            spinner.join()
                        store.close()
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"cache writer thread, CPU us per entry stored ({entries} entries in batches of {batch}, "
          f"median of {rounds} rounds; bound {limit >> 20} MiB)")
    print(f"{'folder':12} {'process':22} {'one by one':>11} {'batched':>9} {'ratio':>7}")
    for where in ("below", "at"):
        for busy in (False, True):
            old, new = (statistics.median(cells[where, busy, bulk]) for bulk in (False, True))
            print(f"{where + ' bound':12} {'a busy thread beside' if busy else 'idle':22} {old:11.1f} {new:9.1f} "
                  f"{old / new:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true", help="only the all-miss throughput, cache off / on / inline")
    parser.add_argument("--miss-seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="each a fresh folder per store; medians reported")
    parser.add_argument("--writes", action="store_true", help="only the writer's CPU per entry, one by one / batched")
    parser.add_argument("--write-entries", type=int, default=10_000)
    args = parser.parse_args()
    if args.writes:
        return write_cost(args.write_entries, args.rounds)
    if args.misses:
        return miss_throughput(args.miss_seconds, args.concurrency)
    keys = [cache_key(request(i)) for i in range(args.entries)]
    key_lat, _ = timed([lambda i=i: cache_key(request(i)) for i in range(2000)])
    base = Path(tempfile.mkdtemp(prefix="lm-cache-bench-"))
    rounds: dict[str, list[dict]] = {kind: [] for kind in NAMES}
    t = time.perf_counter()
    try:
        for r in range(args.rounds):  # stores interleaved, order rotated: a noisy neighbour hits all alike
            kinds = list(NAMES)[r % len(NAMES):] + list(NAMES)[:r % len(NAMES)]
            for kind in kinds:
                rounds[kind].append(measure(kind, base / f"{kind}-{r}", keys, args.writers))
            print(f"  round {r + 1}/{args.rounds} done at {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = {kind: {f: statistics.median(m[f] for m in ms) for f in ms[0]} for kind, ms in rounds.items()}
    report = (table(results, args.writers, pct(key_lat, 0.5), args.entries, args.rounds) + "\n\n"
              + verdict(results, args.writers))
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
