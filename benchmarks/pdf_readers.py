"""pypdf against pypdfium2 on generated PDFs: pages per second and text quality, side by side in one run.

    python benchmarks/pdf_readers.py [--pages 60] [--repeat 3]

Two layouts, each with a known text: ``lines`` (one ``Tj`` per line, the simple case) and ``words``
(every word placed on its own with ``Td`` and kerned ``TJ`` arrays, as typesetters write them, so the
reader must infer the spaces).  Quality is the token F1 of the extracted text against the text drawn;
"words run together" counts extracted tokens that are two drawn words glued.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.doc_fixtures import make_pdf

WORDS = ("fire engine ladder hydrant quay street dock road closed open north south caller reports smoke "
         "near the bridge station medical unit arrives within minutes dispatch confirms crew").split()
TOKEN = re.compile(r"\w+")


def lines_for(pages: int, rng: random.Random) -> list[list[str]]:
    return [[" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(40)] for _ in range(pages)]


def positioned_pdf(pages: list[list[str]]) -> bytes:
    """Each word its own text object, kerned: ``[(fi) -20 (re)] TJ``; spaces only implied by positions."""
    base = make_pdf([["@"] for _ in pages])
    out = base
    for lines in pages:
        ops = []
        for row, line in enumerate(lines):
            x = 72.0
            for word in line.split():
                half = max(1, len(word) // 2)
                ops.append(f"BT /F1 11 Tf {x:.1f} {740 - 14 * row} Td [({word[:half]}) -20 ({word[half:]})] TJ ET")
                x += 6.2 * len(word) + 4.0
        stream = " ".join(ops).encode("latin-1")
        old = b"BT /F1 11 Tf 14 TL 72 740 Td (@) Tj ET"
        out = out.replace(b"<< /Length %d >>\nstream\n" % len(old) + old,
                          b"<< /Length %d >>\nstream\n" % len(stream) + stream, 1)
    return _fix_xref(out)


def _fix_xref(raw: bytes) -> bytes:
    """Recompute the xref offsets after the streams changed length."""
    body, _, _ = raw.partition(b"xref\n")
    offsets = [m.start() for m in re.finditer(rb"(?m)^\d+ 0 obj\n", body)]
    xref = [b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1)] + [b"%010d 00000 n \n" % o for o in offsets]
    trailer = b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1, len(body))
    return body + b"".join(xref) + trailer


def read_pypdf(raw: bytes) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() or "" for page in PdfReader(io.BytesIO(raw)).pages]


def read_pdfium(raw: bytes) -> list[str]:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(raw)
    try:
        return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]
    finally:
        doc.close()


def f1(found: str, truth: str) -> tuple[float, int]:
    got, want = Counter(TOKEN.findall(found.lower())), Counter(TOKEN.findall(truth.lower()))
    overlap = sum((got & want).values())
    if not overlap:
        return 0.0, 0
    p, r = overlap / sum(got.values()), overlap / sum(want.values())
    glued = sum(n for tok, n in got.items() if tok not in want and len(tok) > 6)
    return 2 * p * r / (p + r), glued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pages = lines_for(args.pages, random.Random(7))
    truth = "\n".join("\n".join(p) for p in pages)
    layouts = {"lines": make_pdf(pages), "words": positioned_pdf(pages)}
    readers = {"pypdf": read_pypdf, "pypdfium2": read_pdfium}
    print(f"{args.pages} pages per PDF, best of {args.repeat}")
    print(f"{'layout':8} {'reader':10} {'pages/s':>9} {'token F1':>9} {'glued':>6}")
    rates: dict[tuple[str, str], float] = {}
    for layout, raw in layouts.items():
        for name, read in readers.items():
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                text = "\n".join(read(raw))
                best = min(best, time.perf_counter() - start)
            score, glued = f1(text, truth)
            rates[layout, name] = args.pages / best
            print(f"{layout:8} {name:10} {args.pages / best:9.0f} {score:9.3f} {glued:6d}")
    for layout in layouts:
        print(f"{layout}: pypdfium2 / pypdf speed = {rates[layout, 'pypdfium2'] / rates[layout, 'pypdf']:.1f}x")


if __name__ == "__main__":
    main()
