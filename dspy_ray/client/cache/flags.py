"""The LM cache's command-line switch, declared once for batch, optimize and serve.

Batch and optimize cache by default (``--no-cache`` switches it off for the run); a server
does not unless asked (``--cache``): its callers may expect a fresh answer each time.

    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_cache_arg(parser)
    >>> parser.parse_args(["--no-cache"]).cache, parser.parse_args([]).cache
    (False, True)

The choice reaches the LM through its settings (``cache="off"``), so it travels to every
actor and replica with them: :func:`cache_choice`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dspy_ray.endpoints.settings import EndpointSettings

OFF = "off"


def add_cache_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: bool = True) -> None:
    """``--no-cache`` (``default`` True: batch, optimize), or ``--cache`` / ``--no-cache`` off by default (serve)."""
    where = "LM_CACHE (env or .env; default: ~/.cache/dspy-ray/lm)"
    if default:
        parser.add_argument("--no-cache", dest="cache", action="store_false", default=True,
                            help=f"send every LM call instead of answering repeated ones from the LM cache at {where}")
    else:
        parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=False,
                            help=f"answer repeated identical LM calls from the LM cache at {where}; a response "
                                 f"answered entirely from it carries the header X-Cache: hit")


def cache_choice(settings: EndpointSettings | None, enabled: bool) -> EndpointSettings | None:
    """``settings`` with the cache switched off unless ``enabled`` (None stays None)."""
    if settings is None or enabled:
        return settings
    return settings.model_copy(update={"cache": OFF})
