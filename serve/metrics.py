"""Prometheus metrics for a program server, exported through Ray's metrics agent.

Ray exposes them on each node's metrics port (``ray start --metrics-export-port``;
scraped by Prometheus as ``ray_<name>``):

====================================  =========  =====================================
name                                  type       tags
====================================  =========  =====================================
dspy_serve_requests_total             counter    program, outcome (ok | error)
dspy_serve_request_latency_seconds    histogram  program
dspy_serve_lm_calls_total             counter    program
dspy_serve_lm_tokens_total            counter    program, kind (prompt | completion)
dspy_serve_lm_cached_total            counter    program (LM calls answered from the LM cache: none sent)
dspy_serve_cache_responses_total      counter    program, result (hit | miss: the X-Cache header sent)
dspy_serve_judge_score                gauge      program (last rolling mean, 0..1)
dspy_serve_judge_samples_total        counter    program, outcome (scored | error)
====================================  =========  =====================================
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class ServeMetrics:
    def __init__(self, program: str):
        self.tags = {"program": program}
        self.requests = metrics.Counter("dspy_serve_requests_total", "HTTP predictions served",
                                        tag_keys=("program", "outcome"))
        self.latency = metrics.Histogram("dspy_serve_request_latency_seconds", "Prediction latency",
                                         boundaries=LATENCY_BUCKETS, tag_keys=("program",))
        self.lm_calls = metrics.Counter("dspy_serve_lm_calls_total", "LM calls made", tag_keys=("program",))
        self.tokens = metrics.Counter("dspy_serve_lm_tokens_total", "LM tokens", tag_keys=("program", "kind"))
        self.lm_cached = metrics.Counter("dspy_serve_lm_cached_total", "LM calls answered from the LM cache",
                                         tag_keys=("program",))
        self.cache_responses = metrics.Counter("dspy_serve_cache_responses_total",
                                               "Responses by their X-Cache header (caching on only)",
                                               tag_keys=("program", "result"))
        self.cache_counts = {"hit": 0, "miss": 0, "lm_cached": 0}  # this replica's, for /info

    def record_request(self, seconds: float, ok: bool) -> None:
        self.requests.inc(1, {**self.tags, "outcome": "ok" if ok else "error"})
        self.latency.observe(seconds, self.tags)

    def record_usage(self, usage: dict) -> None:
        self.lm_calls.inc(1, self.tags)
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens") or 0
            if n:
                self.tokens.inc(n, {**self.tags, "kind": kind})


    def record_cache(self, hit: bool, cached_calls: int) -> None:
        """One response's ``X-Cache`` result, and how many of its LM calls the cache answered."""
        result = "hit" if hit else "miss"
        self.cache_counts[result] += 1
        self.cache_responses.inc(1, {**self.tags, "result": result})
        if cached_calls:
            self.cache_counts["lm_cached"] += cached_calls
            self.lm_cached.inc(cached_calls, self.tags)


class JudgeMetrics:
    def __init__(self, program: str):
        self.tags = {"program": program}
        self.score = metrics.Gauge("dspy_serve_judge_score", "Rolling judge score (0..1)", tag_keys=("program",))
        self.samples = metrics.Counter("dspy_serve_judge_samples_total", "Sampled requests judged",
                                       tag_keys=("program", "outcome"))

    def record(self, scored: bool, rolling: float | None) -> None:
        self.samples.inc(1, {**self.tags, "outcome": "scored" if scored else "error"})
        if rolling is not None:
            self.score.set(rolling, self.tags)
