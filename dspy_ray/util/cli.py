"""What every command line of the framework shares: one way to name the task, the endpoints, errors and exit codes.

Batch (``python -m pipelines``), ``pipelines.index`` / ``pipelines.retrieve``, ``optimize`` and ``serve``
build their parsers from these pieces, so a flag means the same thing everywhere::

    >>> parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    >>> _ = add_task_arg(parser, aliases=("--pipeline",), names=["rag", "triage"])
    >>> _ = add_endpoint_args(parser, "LM", in_flight=True)
    >>> _ = parser.add_argument("--workers", type=positive_int, default=4, help="Ray workers")
    >>> args = parser.parse_args(["--pipeline", "triage", "--lm-model", "m"])
    >>> args.task, endpoint_flags(args, "LM")
    ('triage', {'base_url': None, 'model': 'm', 'max_in_flight': None})
    >>> "default: 4" in parser.format_help() and "default: None" not in parser.format_help()
    True

Exit codes (:data:`EXIT_USAGE` ...) belong to exception types, not to their messages: an exception
class says its code with an ``exit_code`` attribute, and :func:`report_error` prints one line (never
a traceback) and returns that code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a default worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


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


# -- the task ------------------------------------------------------------------------------------------


def add_task_arg(parser: argparse.ArgumentParser, *, aliases: Sequence[str] = (), names: Sequence[str] = (),
                 required: bool = True, help: str | None = None) -> argparse.Action:
    """``--task NAME`` (older spellings in ``aliases`` still accepted), stored as ``args.task``."""
    listed = f"{', '.join(names)}, or " if names else ""
    return parser.add_argument("--task", *aliases, dest="task", required=required, metavar="TASK",
                               help=help or f"the task: {listed}your own 'package.module[:ATTR]'")


def peek_task(argv: Sequence[str] | None, *, aliases: Sequence[str] = (), positional: bool = False) -> str | None:
    """The task named in ``argv`` before the full parse (whose flags depend on the task), or None.

    ``positional``: a first argument that is not a flag names the task too (``python -m pipelines triage``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if positional and argv and not argv[0].startswith("-"):
        return argv[0]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", *aliases, dest="task")
    known, _ = pre.parse_known_args(argv)
    return known.task


def parse_with_task(argv: Sequence[str] | None, build_parser: Callable[[T | None], argparse.ArgumentParser],
                    get_task: Callable[[str], T], *, aliases: Sequence[str] = ()) -> tuple[argparse.Namespace, T]:
    """Two passes: find the task first, so its own flags (its resources, its defaults) join the parser.

    An unknown task is a usage error: ``error: <why>`` as one line on stderr and ``SystemExit(2)``, as
    argparse exits (without its usage line, which would not say more than the registry's message).
    ``build_parser(None)``: the parser without a task's flags, which reports a missing ``--task``.
    """
    ref = peek_task(argv, aliases=aliases)
    task = None
    if ref:
        try:
            task = get_task(ref)
        except Exception as exc:  # the registry's own error, whatever its type, is a usage error here
            say(f"error: {one_line(exc)}")
            raise SystemExit(EXIT_USAGE) from None
    args = build_parser(task).parse_args(None if argv is None else list(argv))
    return args, task


# -- endpoints -----------------------------------------------------------------------------------------

_ROLES = {
    "LM": ("lm", "LM endpoint", "the target model"),
    "JUDGE": ("judge", "judge LM endpoint", "the judge model"),
    "EMBED": ("embed", "embedding endpoint", "the embedding model"),
}
_ORDER = "flags > environment > .env > cluster discovery > embedded default"


def add_endpoint_args(parser: argparse.ArgumentParser, role: str, *, in_flight: bool = False,
                      title: str | None = None) -> argparse._ArgumentGroup:
    """``--<role>-base-url`` / ``--<role>-model`` (and ``--<role>-max-in-flight``) in a group of their own.

    ``role`` is the settings prefix (``LM``, ``JUDGE``, ``EMBED``); the key is never a flag: it would
    land in shell history and ``ps``, so it is read from ``<ROLE>_API_KEY`` or ``.env`` only.
    """
    prefix, what, model = _ROLES[role]
    group = parser.add_argument_group(title or f"{what} ({_ORDER})")
    group.add_argument(f"--{prefix}-base-url", default=None,
                       help=f"OpenAI-compatible /v1 base URL (env {role}_BASE_URL)")
    group.add_argument(f"--{prefix}-model", default=None, help=f"{model} id (env {role}_MODEL)")
    if in_flight:
        group.add_argument(f"--{prefix}-max-in-flight", type=positive_int, default=None,
                           help=f"ceiling on concurrent requests, all actors and workers together; below it the "
                                f"number is found at run time from the endpoint's answers (env {role}_MAX_IN_FLIGHT)")
    return group


def endpoint_flags(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """The flags :func:`add_endpoint_args` declared, as ``resolve_settings(role, flags=...)`` takes them."""
    prefix = _ROLES[role][0]
    flags = {"base_url": getattr(args, f"{prefix}_base_url", None), "model": getattr(args, f"{prefix}_model", None)}
    if hasattr(args, f"{prefix}_max_in_flight"):
        flags["max_in_flight"] = getattr(args, f"{prefix}_max_in_flight")
    return flags


# -- messages, errors and exit codes -------------------------------------------------------------------

EXIT_OK = 0
EXIT_USAGE = 2  # bad input or settings: one line on stderr, no LM call made
EXIT_BUDGET = 3  # stopped at a budget or an estimate above its cap
EXIT_ENDPOINT = 4  # the endpoint failed while the run was under way
EXIT_INTERRUPTED = 130


def say(line: str) -> None:
    """One line of progress or a notice, on stderr (stdout is for results)."""
    print(line, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """An exception as one bounded line; a pydantic error as ``field: message; ...``."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        try:
            text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in errors())
        except Exception:  # noqa: BLE001 - fall back to the plain text
            text = str(exc)
    else:
        text = str(exc)
    return " ".join(text.split())[:limit]


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code an exception's type declares (``exit_code``), pydantic's ValidationError as usage;
    None for anything else, which is a bug to show in full rather than a message."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if type(exc).__name__ == "ValidationError":
        return EXIT_USAGE
    return None


def report_error(exc: BaseException, *, usage: tuple[type[BaseException], ...] = ()) -> int:
    """Print ``error: <one line>`` on stderr and return the exit code; re-raise what declares none.

    ``usage``: types a command treats as usage errors though they declare no code (a file it could
    not read: ``OSError``).

        >>> class OverBudget(RuntimeError):
        ...     exit_code = EXIT_BUDGET
        >>> report_error(OverBudget("stopped at --max-cost 5"))  # and on stderr: error: stopped at --max-cost 5
        3
    """
    code = exit_code_for(exc)
    if code is None and isinstance(exc, usage):
        code = EXIT_USAGE
    if code is None:
        raise exc
    say(f"error: {one_line(exc)}")
    return code
