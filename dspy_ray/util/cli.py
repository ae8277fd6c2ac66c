"""What every command line of the framework shares: argument types and help that shows real defaults.

    >>> parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    >>> _ = parser.add_argument("--limit", type=positive_int, default=None, help="rows to read")
    >>> _ = parser.add_argument("--workers", type=positive_int, default=4, help="Ray workers")
    >>> "default: 4" in parser.format_help() and "default: None" not in parser.format_help()
    True
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a default worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_embed_args(parser) -> None:
    """``--embed-base-url`` / ``--embed-model`` (for tasks whose resources embed queries)."""
    group = parser.add_argument_group("embedding endpoint (flags > environment > .env > discovery > embedded "
                                      "embedder)")
    group.add_argument("--embed-base-url", default=None, help="OpenAI-compatible /v1 base URL (env EMBED_BASE_URL)")
    group.add_argument("--embed-model", default=None, help="embedding model id (env EMBED_MODEL)")


def embed_flags(args: argparse.Namespace) -> dict[str, str | None]:
    return {"base_url": getattr(args, "embed_base_url", None), "model": getattr(args, "embed_model", None)}


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a budget in USD, a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value
