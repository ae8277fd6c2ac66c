"""What kind of answer a question asks for, and whether a sentence holds one: classic question typing.

A "how many" question is answered by a sentence with a number in it, a "who"
question by one with a name, "how long" by a duration or a length.  The
extractive RAG answer (:mod:`programs.sentence_rank`) uses it as one of its
ranking signals, to find the number that sits next to the counted noun
("how many tower sites" - "14 tower sites", :func:`counted_words`), and to cut
the answer down to the quantity asked for (:data:`QUANTITY_KINDS`).

    >>> answer_kind("By what time should hikers turn around?")
    'time'
    >>> holds_kind("time", "Turn back by 1:00 p.m. whatever the distance.")
    True
    >>> answer_kind("What does the pack test require?") is None
    True

The patterns are general English, not tied to any corpus.  Pure Python.
"""

from __future__ import annotations

import re

NUMBER = (r"(?:\d[\d,.]*|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|"
          r"forty|fifty|sixty|hundred|thousand|half|dozen)")
_MONTH = r"(?:january|february|march|april|may|june|july|august|september|october|november|december)"
_DAY = r"(?:mon|tues|wednes|thurs|fri|satur|sun)days?"
_YEAR = r"(?:1[6-9]\d\d|20\d\d)s?"
_TIME_SPAN = (rf"\b(?:{NUMBER}|an?)[\s-]+(?:[\w-]+[\s-]+)?(?:seconds?|minutes?|hours?|days?|nights?|weeks?|months?|"
              r"years?|decades?)\b")
_HOW_OFTEN = r"\b(?:daily|weekly|monthly|annually|yearly)\b"
_DURATION = rf"{_TIME_SPAN}|{_HOW_OFTEN}|\bevery\b"
_MEASURE = (rf"\b{NUMBER}[\s-]*(?:feet|foot|ft|miles?|inches|inch|yards?|meters?|metres?|km|kilometers?|kilometres?|"
            r"pounds?|lbs?|tons?|gallons?|liters?|litres?|acres?|degrees?|mph|psi|dba|db|storeys?|stories|floors?)"
            r"\b|°")
_NAME = r"\b[A-ZÀ-Ý][\w'’.-]+(?:\s+(?:of\s+(?:the\s+)?|de\s+|van\s+)?[A-ZÀ-Ý][\w'’.-]+)+"

# What a sentence answering each kind of question holds (names and places are case-sensitive).
HOLDS = {
    "year": re.compile(rf"\b{_YEAR}\b"),
    "date": re.compile(rf"\b{_YEAR}\b|\b{_MONTH}\b|\b{_DAY}\b|\bnoon\b|\bmidnight\b", re.IGNORECASE),
    # a time of day: "what time ... open on Saturdays" is not answered by "on Wednesdays and Saturdays"
    "time": re.compile(r"\b\d{1,2}[:.]\d\d\b|\b\d{3,4} hours\b|\b[ap]\.?m\.?(?!\w)|\bnoon\b|\bmidnight\b|"
                       r"\bo'clock\b|\baround the clock\b|\b24 hours\b", re.IGNORECASE),
    "frequency": re.compile(r"\b\d+(?:\.\d+)?\s*[kMG]Hz\b", re.IGNORECASE),  # a radio frequency
    "duration": re.compile(_DURATION, re.IGNORECASE),
    "length": re.compile(f"{_DURATION}|{_MEASURE}", re.IGNORECASE),
    "money": re.compile(r"\$\s?\d|\b\d[\d,.]*\s*(?:dollars?|cents?)\b|\bfree\b|\bno (?:fee|charge|cost)\b", re.IGNORECASE),
    "percent": re.compile(r"\d\s?%|\bper ?cent\b|\bhalf\b|\bquarter\b|\bthird\b", re.IGNORECASE),
    "measure": re.compile(_MEASURE, re.IGNORECASE),
    # a number that is not part of a date: "14 March 1992" says when, not how many
    "count": re.compile(rf"\b(?!{_YEAR}\b){NUMBER}\b(?!\s+{_MONTH}\b)", re.IGNORECASE),
    "name": re.compile(_NAME),
    "place": re.compile(rf"\b\d+\s+[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+)*|{_NAME}"),
    "day": re.compile(rf"\b{_DAY}\b|\bweek(?:end|day)s?\b", re.IGNORECASE),
    "phone": re.compile(r"\(\d{3}\)\s*\d{3}[-.\s]\d{4}|\b(?:\d{3}[-.])?\d{3}[-.]\d{4}\b|\b\d{2,3}-\d{3}\b|\b[2-9]11\b"),
}

_ANY = r"(?:[\w'’-]+\s+){0,3}?"  # up to three words between "what" and the noun that names the kind
_MONEY_NOUNS = r"(?:cost|costs|fee|fees|price|fine|fines|salary|stipend|budget|rate|wage|pay|charge|value|amount)"
_MEASURE_NOUNS = r"(?:height|depth|distance|length|width|weight|thickness|temperature|speed|ceiling|size|capacity|area)"
# The first pattern a question matches names its kind: the narrower kinds come first.
ASKS = tuple((re.compile(pattern, re.IGNORECASE), kind) for pattern, kind in (
    (r"^\s*(?:which|what)\s+days?\b|\bday of the week\b", "day"),
    (r"\b(?:phone|telephone|fax|hotline|contact|emergency) (?:number|line)s?\b|"
     r"\b(?:what|which) number\b.*\b(?:call|dial|text)\b", "phone"),
    (r"\bhow long\b", "length"),
    (r"\b(?:time limit|duration)\b|\bhow (?:soon|often|quickly|frequently)\b|"
     r"\bhow many (?:seconds|minutes|hours|days|nights|weeks|months|years)\b", "duration"),
    (rf"\b(?:what|which)\s+{_ANY}(?:time|hours)\b|\bby when\b", "time"),
    (r"\bradio frequenc|\bfrequenc(?:y|ies)\b.*\b(?:radio|talkgroup|channel|band|repeater)s?\b", "frequency"),
    (rf"\bhow much\b.*\b(?:cost|pay|charge|spend|budget|fee|fine|receive|worth)\w*\b|"
     rf"\b(?:what|which)\s+{_ANY}{_MONEY_NOUNS}\b|\bwhat does\b.*\bcost\b", "money"),
    (rf"\b(?:what|which)\s+{_ANY}(?:percentage|share|proportion|percent|fraction)\b", "percent"),
    (r"\bhow (?:high|tall|far|deep|thick|wide|heavy|big|large|fast|close|hot|cold)\b|"
     rf"\b(?:what|which)\s+{_ANY}{_MEASURE_NOUNS}\b", "measure"),
    (r"\b(?:what|which) years?\b", "year"),
    (r"^\s*(?:when|since when)\b|\band when\b|\b(?:what|which) (?:date|month)\b", "date"),
    (rf"\bhow (?:many|much)\b|\b(?:what|which)\s+{_ANY}(?:number|age|ages|score|population|count|total|limit|"
     r"target|goal|minimum|maximum|standard|threshold)\b|"
     r"\b(?:below|above|over|under|from|at|to) what\b", "count"),
    # "who can / may / must ..." asks who qualifies (veterans, residents), not for someone's name
    (r"^\s*(?:who|whom|whose)\b(?!\s+(?:can|may|must|should|is eligible|are eligible|qualif))|\b(?:which|what) (?:hospital|agency|company|person|official|officer|department|"
     r"office|organi[sz]ation|unit|station|team)\b", "name"),
    (r"^\s*where\b|\b(?:which|what) (?:place|address|location|road|street|building|site|town|city|communit(?:y|ies))\b",
     "place"),
))
# Kinds whose answer is a quantity (a number with its unit): the extractive answer may be cut down to it
# (programs.extract.answer_span), as a sentence often words it otherwise than the answer ("a 107-foot ladder":
# "107 feet").  A date, a time, a sum or a name is mostly written as asked, so the whole sentence already holds it:
# cut down, those gained nothing on the training questions (benchmarks/rag_rank_fit.py).
QUANTITY_KINDS = frozenset({"count", "measure", "length", "duration"})
# The quantity itself, where HOLDS only tells that a sentence holds one: "every" alone is no amount of time.
_QUANTITIES = {
    "duration": re.compile(f"{_TIME_SPAN}|{_HOW_OFTEN}", re.IGNORECASE),
    "length": re.compile(f"{_TIME_SPAN}|{_HOW_OFTEN}|{_MEASURE}", re.IGNORECASE),
}
_HOW_MANY = re.compile(r"\bhow many ([a-z][a-z-]+)(?:\s+([a-z][a-z-]+))?", re.IGNORECASE)


def answer_kind(question: str) -> str | None:
    """The kind of answer ``question`` asks for (a key of :data:`HOLDS`), or None when it does not say."""
    for asks, kind in ASKS:
        if asks.search(str(question)):
            return kind
    return None


def holds_kind(kind: str | None, text: str) -> bool:
    """Whether ``text`` holds an answer of ``kind`` (False for no kind)."""
    return kind is not None and bool(HOLDS[kind].search(str(text)))


def quantity_pattern(kind: str) -> re.Pattern:
    """What an answer of ``kind`` (one of :data:`QUANTITY_KINDS`) looks like as a phrase of its own."""
    return _QUANTITIES.get(kind, HOLDS[kind])


def counted_words(question: str) -> tuple[str, ...]:
    """The (up to two) words after "how many" ("how many tower sites" -> ("tower", "sites")), lower-cased."""
    found = _HOW_MANY.search(str(question))
    return tuple(w.lower() for w in found.groups() if w) if found else ()
