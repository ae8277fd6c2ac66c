"""Render a page in headless Chromium with no network but 127.0.0.1 (Debian's chromium, no Python package).

``--host-resolver-rules`` makes every host name but 127.0.0.1 unresolvable, so a page that needs a
CDN stays blank even on a machine with internet; ``--virtual-time-budget`` lets the page's scripts
(and the requests they make to 127.0.0.1) finish before the DOM is dumped.

    >>> dom = dump_dom("http://127.0.0.1:8000/docs")      # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def chromium() -> str | None:
    # Debian's /usr/bin/chromium is a shell wrapper around /usr/lib/chromium/chromium.
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def dump_dom(url: str, *, budget_ms: int = 10_000, timeout_s: float = 90) -> str:
    binary = chromium()
    assert binary, "chromium is not installed (bash scripts/install.sh test installs it)"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    return out.stdout.decode(errors="replace")
