"""The extractive RAG answer's parts without a model: question typing, sentence ranking, confidence, declining.

Real inputs: training questions (never dev ones) and the shipped corpus documents that answer them."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from programs.answer_kinds import answer_kind, counted_words, holds_kind
from programs.extract import answer_span, answer_text, terms
from programs.rag import CitedRAG
from programs.sentence_rank import (
    DECLINE_BELOW,
    PER_SOURCE,
    SIMILARITY_UNKNOWN,
    answer_confidence,
    confidence_features,
    kind_missing,
    rank_candidates,
)
from programs.similarity import similarity_of

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {row["question"]: row for row in map(json.loads, (ROOT / "data/rag_train.jsonl").read_text().splitlines())}


@dataclass
class Doc:
    id: str
    source: str
    text: str
    title: str = ""
    section: str = ""


def gold_document(question: str) -> Doc:
    """The first document a training question's gold answer comes from, whole, as one passage."""
    source = TRAIN[question]["sources"][0]
    return Doc(f"{source}:0", source, (ROOT / "data/rag/corpus" / source).read_text())


@pytest.mark.parametrize("question, kind", [
    ("How many tower sites does the current county radio system use?", "count"),
    ("When did Wrenhaven County stop using ten-codes on the radio?", "date"),
    ("In which year did Animal Services become part of the Department of Public Safety?", "year"),
    ("During what hours are animal control officers on duty?", "time"),
    ("How long is the basic CERT course?", "length"),
    ("After a working fire, how soon must crews shower?", "duration"),
    ("How much overtime is budgeted for FY2025?", "money"),
    ("What is the school-zone speed limit in unincorporated Wrenhaven County?", "measure"),
    ("Who coordinates the CERT program?", "name"),
    ("Who can use the 311 line?", None),  # who qualifies ("residents inside the city limits"), not a name
    ("Where was a peak-demand ambulance posted as a summer 2025 trial?", "place"),
    ("What is the phone number of the regional poison information service?", "phone"),
    ("Why is Echo never spoken as \"Priority E\" on the radio?", None),
])
def test_answer_kind_of_training_questions(question, kind):
    assert question in TRAIN and answer_kind(question) == kind


def test_what_an_answer_of_each_kind_holds():
    assert holds_kind("time", "Officers are on duty from 07:00 to 23:00 every day.")
    assert holds_kind("money", "Overtime alone is budgeted at $9.7 million.")
    assert holds_kind("duration", "crews must shower within an hour of returning to the station")
    assert holds_kind("year", "It became a division of the department in 2011.")
    assert not holds_kind("year", "It has 14 tower sites.") and not holds_kind(None, "anything")
    assert holds_kind("name", "The coordinator is Hyun-woo Castellanos.") and not holds_kind("name", "no names here.")
    assert counted_words("How many tower sites does it use?") == ("tower", "sites")
    assert holds_kind("phone", "call the recorded burn-day line at (555) 310-4390") and holds_kind("phone", "dial 911")
    assert not holds_kind("phone", "It has 14 tower sites.") and not holds_kind("phone", "from 2013-2014")


def test_a_time_is_a_time_of_day_and_a_radio_frequency_a_kind_of_its_own():
    """"What time ... on Saturdays?" is not answered by the days a place is open; "what radio frequency" asks
    for one in MHz (and "how frequently" stays a duration)."""
    assert answer_kind("What time does the transfer station open on Saturdays?") == "time"
    assert not holds_kind("time", "It accepts yard waste on Wednesdays and Saturdays.")
    assert holds_kind("time", "Burning is allowed from 0800 hours.") and holds_kind("time", "staffed 24 hours a day")
    assert answer_kind("What radio frequency does the fire dispatch talkgroup use?") == "frequency"
    assert answer_kind("Which frequency does the EMS channel use?") == "frequency"
    assert answer_kind("How frequently are hydrants flushed?") == "duration"
    assert holds_kind("frequency", "Fire dispatch is on 154.250 MHz.") and not holds_kind("frequency", "at 08:00 daily")


def test_a_question_of_an_exact_kind_no_sentence_holds_is_declined():
    """A training question the corpus does not answer ("the fine for parking on a snow route"): over a passage
    that says what happens but names no sum, declined however close the embedder puts it; the same passage with
    the sum is answered. A "how many" question is declined when no number counts what it asks about."""
    question = "What is the fine for parking on a snow route during a snow emergency?"
    assert not TRAIN[question]["answerable"] and answer_kind(question) == "money"
    towed = Doc("snow:0", "snow.md", "Snow routes are marked with blue signs. During a snow emergency, vehicles "
                                     "parked on a snow route are towed at the owner's expense.")
    fined = Doc("snow:1", "snow.md", towed.text + " Parking on a snow route during a snow emergency is fined $150.")
    assert kind_missing(question, rank_candidates(question, [towed]))
    out = CitedRAG(Retriever([towed], FixedClient(1.0)), answer_style="extract")(question=question)
    assert out.answerable is False and out.citations == []
    out = CitedRAG(Retriever([fined], FixedClient(1.0)), answer_style="extract")(question=question)
    assert out.answerable is True and "$150" in out.answer and out.citations == ["snow:1"]
    count = "How many tow trucks does the county keep for snow emergencies?"
    assert answer_kind(count) == "count" and kind_missing(count, rank_candidates(count, [towed]))
    kept = Doc("snow:2", "snow.md", towed.text + " The county keeps 6 tow trucks on call.")
    assert not kind_missing(count, rank_candidates(count, [kept]))


def test_a_how_many_question_no_number_counts_is_declined():
    """A training question the corpus does not answer, over the section nearest its topic: its numbers count
    zones, incidents and years, none of them ambulances or anything else the question names, so the program
    declines however close the embedder puts the section. A number before another of the question's words
    answers it ("84,300 registered subscribers" for "How many people were subscribed"), and a year is no count."""
    question = "How many ambulances does Brennock County operate?"
    assert not TRAIN[question]["answerable"] and answer_kind(question) == "count"
    for section in (mutual_aid_section(8, 10), mutual_aid_section(11, 12)):  # "Since 2019, Oster County ambulances"
        assert kind_missing(question, rank_candidates(question, [section]))
        out = CitedRAG(Retriever([section], FixedClient(1.0)), answer_style="extract")(question=question)
        assert out.answerable is False and out.citations == []
    subscribed = "How many people were subscribed to WrenAlert at the end of 2024?"
    assert TRAIN[subscribed]["answerable"] and counted_words(subscribed) == ("people", "were")
    alerts = Doc("wrenalert:0", "emergency_management/wrenalert.html",
                 "At the end of 2024, WrenAlert had 84,300 registered subscribers.")
    assert not kind_missing(subscribed, rank_candidates(subscribed, [alerts]))
    assert not holds_kind("count", "On 14 March 1992 a valve failed.") and holds_kind("count", "about 1,100 left")


def test_the_unit_a_how_many_question_counts_is_part_of_the_answer():
    """"How many years ..." is answered by "ten years": the counted unit is not dropped as one of the question's
    own words before looking for a duration (it was, and the sentence scored as holding none)."""
    question = "How many years after manufacture is firefighting protective gear taken out of service?"
    assert answer_kind(question) == "duration"
    ranked = rank_candidates(question, [gold_document(question)])
    retired = next(c for c in ranked if "ten years after its date of manufacture" in c.sentence)
    assert retired.features["kind"] == 1.0


@pytest.mark.parametrize("question, answer", [
    ("How long is the ladder on Ladder 1?", "107-foot"),  # gold "107 feet": the whole sentence fails the grading
    ("How quickly must a dispatcher send the first unit to an Echo call?", "within 45 seconds"),
    ("How many tower sites does the current county radio system use?", "14 tower sites"),
])
def test_the_answer_is_the_quantity_the_top_sentence_states(question, answer):
    """A question asking for a quantity is answered with the one its top sentence states (with the words that
    qualify it or say what it counts), not the whole sentence ("Ladder 1 is a tractor-drawn aerial with a
    107-foot ladder and a tiller operator who steers the rear wheels.")."""
    ranked = rank_candidates(question, [gold_document(question)])
    assert answer_text(ranked[0].sentence, question) == answer and answer in ranked[0].sentence
    out = CitedRAG(Retriever([gold_document(question)], FixedClient(1.0)), answer_style="extract")(question=question)
    assert out.answer == answer and out.citations == [gold_document(question).id]  # the citation stays the passage


def test_without_one_confident_quantity_the_sentence_stays_whole():
    """No cut when the sentence states two quantities of the kind (which one is asked?), when the question asks
    two things, or asks for no quantity (a date or a name is mostly written as asked); two joined as a range
    are one."""
    marine = ("Marine 7 is a 28-foot aluminium fireboat with a 750-gallon-per-minute pump that draws water "
              "straight from the lake.")
    assert answer_span("How much water per minute can Marine 7's pump deliver?", marine) is None
    facilities = ("There are 61 facilities in the county that must file annual chemical inventory reports, and 34 "
                  "of them are in Serrano Flats.")
    assert answer_span("How many facilities file chemical inventory reports, and how many are in Serrano Flats?",
                       facilities) is None
    assert answer_span("When did Wrenhaven County stop using ten-codes on the radio?",
                       "Ten-codes were retired in Wrenhaven County on 1 January 2013.") is None
    assert answer_span("Who coordinates the CERT program?", "The coordinator is Hyun-woo Castellanos.") is None
    assert answer_span("How long is the basic course?", "The course lasts 4 to 6 weeks, taught in the evenings.") \
        == "4 to 6 weeks"
    item = "1. **Gear** is retired ten years after it was made."
    assert answer_text(item) == "Gear is retired ten years after it was made."  # no question: the whole sentence
    assert answer_text(item, "How many years after it was made is gear retired?") == "ten years"


def test_terms_stem_like_bm25_and_split_hyphenated_words():
    assert terms("subscribed") == terms("subscribers") and terms("licensed") == terms("license")
    assert terms("school-zone speed") == terms("school zone speed")
    assert terms("7,412 feet at 4:30") == ["7,412", "feet", "4:30"]  # numbers stay whole


@pytest.mark.parametrize("question, expected", [
    ("How many tower sites does the current county radio system use?", "with 14 tower sites"),
    ("When did Wrenhaven County stop using ten-codes on the radio?", "on 1 January 2013"),
    ("Who coordinates the CERT program?", "Hyun-woo Castellanos"),
    ("During what hours are animal control officers on duty?", "from 07:00 to 23:00"),
    ("How many wildfire evacuation zones does the county have?", "38 wildfire evacuation zones"),
    ("How much overtime is budgeted for FY2025?", "$9.7 million"),
])
def test_the_top_sentence_of_the_gold_document_answers(question, expected):
    """Out of every sentence of a 3,500-4,300 character document, the ranker's first holds the answer."""
    doc = gold_document(question)
    ranked = rank_candidates(question, [doc])
    assert len(ranked) > 20 and expected in ranked[0].sentence
    assert ranked[0].passage is doc and ranked[0].features["similarity"] == SIMILARITY_UNKNOWN


def test_the_retrievers_order_is_a_signal():
    """The same sentence in a passage ranked lower scores less; a sentence appears once, with its best passage."""
    question = "How many wildfire evacuation zones does the county have?"
    doc = gold_document(question)
    copy = Doc("copy:0", "copy", doc.text)
    first = rank_candidates(question, [doc, copy])
    assert first[0].passage is doc and len({c.sentence for c in first}) == len(first)
    shifted = rank_candidates(question, [Doc("other:0", "other", "Unrelated text about budgets."), doc])
    assert shifted[0].sentence == first[0].sentence and shifted[0].score < first[0].score


def test_confidence_rises_with_similarity_and_margin():
    question = "Who coordinates the CERT program?"
    ranked = rank_candidates(question, [gold_document(question)])
    base = confidence_features(ranked)
    assert answer_confidence({**base, "similarity": 0.8}) > answer_confidence({**base, "similarity": 0.3})
    assert answer_confidence({**base, "margin": 3.0}) > answer_confidence({**base, "margin": 0.0})
    assert answer_confidence(confidence_features([])) < DECLINE_BELOW  # nothing to answer with


class BagOfWordsClient:
    """An embedding client for tests: hashed bags of stemmed words, unit length; ``fail`` makes it raise."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def embed(self, texts, kind="passage"):
        self.calls.append(kind)
        if self.fail:
            raise ConnectionError("embedder down")
        vectors = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for term in terms(text):
                vectors[i, zlib.crc32(term.encode()) % 64] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return type("Result", (), {"vectors": vectors / np.where(norms > 0, norms, 1),
                                   "errors": [None] * len(texts)})()


class Retriever:
    def __init__(self, passages, client=None):
        self.passages, self.client = passages, client

    def search(self, query, k=None):
        return self.passages[: k or len(self.passages)]


def test_similarity_comes_from_the_retrievers_embedder_and_fails_soft():
    question = "Who coordinates the CERT program?"
    sentences = ["The program's coordinator is Hyun-woo Castellanos.", "Training is free."]
    cosines = similarity_of(Retriever([], BagOfWordsClient()))(question, sentences)
    assert cosines[0] > cosines[1] >= 0.0
    assert similarity_of(Retriever([])) is None  # BM25 mode or a stub: no embedder, no signal
    assert similarity_of(Retriever([], BagOfWordsClient(fail=True)))(question, sentences) is None
    ranked = rank_candidates(question, [gold_document(question)], similarity=lambda q, s: None)
    assert all(c.features["similarity"] == SIMILARITY_UNKNOWN for c in ranked)


class FixedClient:
    """Every question on one axis and every sentence on another (``cosine`` 0), or all on one (``cosine`` 1)."""

    def __init__(self, cosine: float):
        self.cosine = cosine

    def embed(self, texts, kind="passage"):
        axis = np.array([1.0, 0.0]) if kind == "query" or self.cosine else np.array([0.0, 1.0])
        return type("Result", (), {"vectors": np.tile(axis, (len(texts), 1)), "errors": [None] * len(texts)})()


MUTUAL_AID = "policies/2025/mutual_aid_agreements.md"


def mutual_aid_section(first: int, last: int) -> Doc:
    """Paragraphs ``first`` to ``last`` of the mutual-aid agreements, as one passage: 8-10 are the section on
    Brennock County, 11-12 the one on Oster County."""
    paragraphs = (ROOT / "data/rag/corpus" / MUTUAL_AID).read_text().split("\n\n")
    return Doc(f"{MUTUAL_AID}:{first}", MUTUAL_AID, "\n\n".join(paragraphs[first:last + 1]))


def test_the_program_declines_when_its_best_sentence_is_far_from_the_question():
    """A training question the corpus does not answer, over the section nearest its topic (what every engine
    carries, a thermal imaging camera among it, no brand); declined when the embedder puts its best sentence far
    from the question, answered (from the section) when it puts it close."""
    question = "What brand of thermal imaging camera do Wrenhaven engines carry?"
    assert not TRAIN[question]["answerable"] and answer_kind(question) is None
    source = "fire/apparatus_and_equipment.md"
    paragraphs = (ROOT / "data/rag/corpus" / source).read_text().split("\n\n")
    near = Doc(f"{source}:14", source, "\n\n".join(paragraphs[14:17]))
    assert "thermal imaging camera" in near.text
    far = CitedRAG(Retriever([near], FixedClient(0.0)), answer_style="extract")(question=question)
    assert far.answerable is False and far.citations == [] and far.cited == []
    close = CitedRAG(Retriever([near], FixedClient(1.0)), answer_style="extract")(question=question)
    assert close.answerable is True and close.citations == [near.id]
    assert close.answer in " ".join(near.text.replace("**", "").split())
    never = CitedRAG(Retriever([near], FixedClient(0.0)), answer_style="extract", decline_below=0.0)
    assert never(question=question).answerable is True  # decline_below=0: always answers


def test_a_passage_that_never_names_what_the_question_names_lowers_confidence():
    """The same question over the Oster County section, which never names Brennock: the top sentence ("Oster
    County ambulances are automatically dispatched ...") is as close and as far ahead of the next, but only half
    of the question's names are in its passage, and the confidence is lower for it."""
    question = "How many ambulances does Brennock County operate?"
    oster, brennock = mutual_aid_section(11, 12), mutual_aid_section(8, 10)
    assert "Brennock" not in oster.text and "Brennock" in brennock.text
    features = confidence_features(rank_candidates(question, [oster]))
    assert features["names_in_passage"] < 1.0 and features["kind"] == 1.0  # "how many": it holds a number
    assert confidence_features(rank_candidates(question, [brennock]))["names_in_passage"] == 1.0
    assert answer_confidence(features) < answer_confidence({**features, "names_in_passage": 1.0})
    assert answer_confidence({**features, "kind": -1.0}) < answer_confidence(features)


def test_the_program_answers_from_the_gold_document():
    question = "How much overtime is budgeted for FY2025?"
    out = CitedRAG(Retriever([gold_document(question)], BagOfWordsClient()), answer_style="extract")(
        question=question)
    assert out.answerable is True and "$9.7 million" in out.answer
    assert [c.source for c in out.cited] == TRAIN[question]["sources"][:1]


class CappedRetriever:
    """Ranks a fixed list of passages and caps them per document as the framework's retriever does: ``per_source``
    None is its own cap (2), 0 none; records each call's ``per_source``."""

    def __init__(self, passages, client=None):
        self.passages, self.client, self.calls = passages, client, []

    def search(self, query, k=None, *, per_source=None):
        self.calls.append(per_source)
        cap, seen, out = 2 if per_source is None else per_source, Counter(), []
        for p in self.passages:
            if not cap or seen[p.source] < cap:
                seen[p.source] += 1
                out.append(p)
        return out[: k or 5]


def budget_passages() -> list[Doc]:
    """The FY2025 budget document in three passages (overtime in the third), then another document."""
    source = "budget/fy2025_budget.md"
    paragraphs = (ROOT / "data/rag/corpus" / source).read_text().split("\n\n")
    parts = ["\n\n".join(paragraphs[:4]), "\n\n".join(paragraphs[4:7]), "\n\n".join(paragraphs[7:9])]
    other = "policies/2025/mutual_aid_agreements.md"
    return [Doc(f"{source}:{n}", source, text) for n, text in enumerate(parts)] + [
        Doc(f"{other}:0", other, (ROOT / "data/rag/corpus" / other).read_text()[:1500])]


def test_the_programs_own_cap_of_passages_per_document_reaches_the_third_passage():
    """The answer sits in a third passage of a document already represented: under the retriever's cap of 2 the
    program never sees it; with its own cap (the shipped extract artifact's, 3 per document) its top sentence is
    the answer (ranked on words alone, no embedder, and never declining here: what is retrieved is under test,
    not the embedder or the confidence)."""
    question = "How much overtime is budgeted for FY2025?"
    assert "overtime" in budget_passages()[2].text and "$9.7 million" in budget_passages()[2].text
    capped = CappedRetriever(budget_passages())
    before = CitedRAG(capped, answer_style="extract", decline_below=0.0)(question=question)
    assert capped.calls == [None] and "$9.7 million" not in before.answer
    assert "budget/fy2025_budget.md:2" not in before.retrieved_ids
    uncapped = CappedRetriever(budget_passages())
    after = CitedRAG(uncapped, answer_style="extract", per_source=PER_SOURCE, decline_below=0.0)(question=question)
    assert (PER_SOURCE == 0 or PER_SOURCE >= 3) and uncapped.calls == [PER_SOURCE]
    assert after.answerable is True and "$9.7 million" in after.answer
    assert after.citations == ["budget/fy2025_budget.md:2"]


def test_the_framework_retriever_takes_a_cap_per_search():
    from dspy_ray.retrieval.retriever import Retriever as FrameworkRetriever

    retriever = FrameworkRetriever.__new__(FrameworkRetriever)  # only search's forwarding is under test
    seen = []
    retriever.search_many = lambda queries, k=None, **options: seen.append((queries, k, options)) or [["hit"]]
    assert retriever.search("q", 4, per_source=0) == ["hit"] and retriever.search("q") == ["hit"]
    assert seen == [(["q"], 4, {"per_source": 0}), (["q"], None, {"per_source": None})]
