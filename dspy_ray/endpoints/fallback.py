"""Open the endpoints a run needs: the last two steps of the resolution order in :mod:`dspy_ray.endpoints.settings`.

Batch, optimize and serve all resolve endpoints the same way::

    lm = resolve_settings("LM", flags={"base_url": args.lm_base_url, ...})    # flags > env > .env
    with open_endpoints(lm=lm, judge=resolve_settings("JUDGE")) as ep:      # > discovery > embedded
        ep.lm, ep.judge                                                     # ready EndpointSettings

* **discovery** (when Ray is connected): an empty base URL is filled from the
  cluster's Serve LLM app (:mod:`dspy_ray.endpoints.discovery`);
* **embedded default**: a target LM still unset starts the embedded llama.cpp
  model (:mod:`dspy_ray.endpoints.local.llm_server`) for the length of the block; a judge still unset
  is the target at temperature 0; an embedder still unset starts the embedded
  embedder (:mod:`dspy_ray.endpoints.local.embedder_server`).

Every fallback is said on stderr, so nobody is surprised by which model answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.util import cli

# What a user set explicitly (flags, environment, .env) wins over the embedded server's own defaults.
_USER_TUNABLE = {"temperature", "max_tokens", "max_attempts", "timeout_s", "max_in_flight", "adaptive", "price_in",
                 "price_out"}


@dataclass(frozen=True)
class Endpoints:
    lm: EndpointSettings | None
    judge: EndpointSettings | None
    embed: EndpointSettings | None


@contextlib.contextmanager
def open_endpoints(
    lm: EndpointSettings | None = None,
    judge: EndpointSettings | None = None,
    embed: EndpointSettings | None = None,
    *,
    discover: bool = True,
    say: Callable[[str], None] = cli.say,
) -> Iterator[Endpoints]:
    """Discovery, then embedded defaults, for each role given (None = not needed)."""
    if discover:
        import ray

        if ray.is_initialized():
            from dspy_ray.endpoints.discovery import discover_endpoints

            found = discover_endpoints({"LM": lm, "JUDGE": judge, "EMBED": embed})
            lm, judge, embed = found["LM"], found["JUDGE"], found["EMBED"]
    with contextlib.ExitStack() as stack:
        if lm is not None and not lm.base_url:
            lm = stack.enter_context(_embedded_lm(lm, say))
        if judge is not None and not judge.base_url:
            if lm is None:
                raise ValueError("no judge endpoint configured (JUDGE_BASE_URL) and no target to fall back to")
            say("no judge endpoint configured (JUDGE_BASE_URL): the target model judges, at temperature 0")
            judge = lm.model_copy(update={"max_tokens": judge.max_tokens})
        if judge is not None:
            judge = judge.model_copy(update={"temperature": 0.0})
        if embed is not None and not embed.base_url:
            embed = stack.enter_context(_embedded_embedder(embed, say))
        yield Endpoints(lm, judge, embed)


@contextlib.contextmanager
def _embedded_lm(settings: EndpointSettings, say: Callable[[str], None]) -> Iterator[EndpointSettings]:
    from dspy_ray.endpoints.local.llm_server import EmbeddedLM

    say("no LM endpoint configured (LM_BASE_URL): starting the embedded llama.cpp model")
    with EmbeddedLM.start() as server:
        chosen = settings.model_fields_set & _USER_TUNABLE
        yield server.settings(**{k: getattr(settings, k) for k in chosen})


@contextlib.contextmanager
def _embedded_embedder(settings: EndpointSettings, say: Callable[[str], None]) -> Iterator[EndpointSettings]:
    from dspy_ray.endpoints.local.embedder_server import EmbeddedEmbedder

    say("no embedding endpoint configured (EMBED_BASE_URL): starting the embedded embedder")
    with EmbeddedEmbedder.start() as server:
        chosen = settings.model_fields_set & (_USER_TUNABLE | {"batch_size"})
        yield server.settings(**{k: getattr(settings, k) for k in chosen})
