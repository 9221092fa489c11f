# ruff: noqa: E501  (the template tables below are data, one row per line)
"""Second QA case generator ("facts"): paraphrased questions over real passages, for the reuse harness.

Unlike `planted_facts` (one fact; the question mirrors the fact's wording), a case here is a
ready-made retrieved context: `num_chunks` real passages (`corpus.topic_passages`, the same
source) in prompt order, with facts planted by `planted_facts.plant_sentence`. Kinds:

- "number": a count, measure, price or time ("1,250,000 cubic metres", "2:14:37");
- "date": a day, month and year ("14 March 1873"; "March 14, 1873" also counts);
- "two_facts": two facts in two chunks that must both be used, either a conjunction ("the
  upper half of the flag is teal", "the lower half is ochre" -> both colours) or a bridge
  ("the observatory is directed by X", "X was born in Y" -> Y).

The question never repeats the fact sentence's wording. Cases cycle over kind x position
("first" or "last": where the (first) needed fact's chunk sits in the context) x size (4, 8,
12 chunks), and every other cycle adds a decoy: the same template about another place in a
distractor chunk. Everything comes from one seeded RNG: the same (n, seed, Python version)
gives the same cases. Names are unique across the cases of one call.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redknot_rag.evaluation.corpus import topic_passages
from redknot_rag.evaluation.planted_facts import PlantedCase, plant_sentence
from redknot_rag.retrieval.parser import Document

KINDS = ("number", "date", "two_facts")
POSITIONS = ("first", "last")
SIZES = (4, 8, 12)


@dataclass(frozen=True)
class FactCase:
    """One question over `chunks` (prompt order); the facts it needs sit in `fact_chunks`.

    `answers` are the gold values as the facts write them; an output is correct when it
    contains every one of them (`is_correct`; spellings in `accepted` count too)."""

    case_id: str
    kind: str
    question: str
    answers: tuple[str, ...]
    accepted: tuple[tuple[str, ...], ...]  # per answer: the spellings that count
    chunks: tuple[str, ...]
    fact_chunks: tuple[int, ...]  # chunk index of each needed fact, in fact order
    fact_sentences: tuple[str, ...]
    position: str  # "first" | "last": where fact_chunks[0] sits
    decoy_sentence: str | None  # the first fact's template about another place, in another chunk

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def has_decoy(self) -> bool:
        return self.decoy_sentence is not None

    def is_correct(self, text: str) -> bool:
        """True when `text` states every answer (case-, punctuation- and thousands-separator-insensitive)."""
        norm = normalize_answer(text)
        return all(any(_contains(norm, normalize_answer(a)) for a in group) for group in self.accepted)


def normalize_answer(text: str) -> str:
    """Lowercase; drop thousands separators ("4,821" -> "4821") and ordinal suffixes ("14th" -> "14");
    other punctuation except ':' (times) becomes space; whitespace collapses."""
    t = text.lower()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", r"\1", t)
    t = re.sub(r"[^\w:]+", " ", t)
    return " ".join(t.split())


def _contains(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as whole words/numbers ("21" does not match inside "2145")."""
    return re.search(rf"(?<![\w]){re.escape(answer)}(?![\w])", text) is not None


@dataclass(frozen=True)
class _Single:
    fact: str
    question: str
    key: str  # the field that answers


# fact | question | answer field. {place} is a fictional place name.
_NUMBER_TABLE = """
    Records kept by the harbour office show that the {place} canal was dug in {year}. | In which year was the canal at {place} dug? | year
    Every visitor to the {place} clock tower climbs {steps} steps to reach the top. | How many steps lead to the top of the clock tower in {place}? | steps
    At the last count the {place} reservoir held {volume} cubic metres of water. | How much water, in cubic metres, does the reservoir at {place} hold? | volume
    A single ticket for the {place} regatta costs {price} crowns. | How many crowns do you pay for one ticket to the regatta in {place}? | price
    The fastest time ever run in the {place} marathon is {time}. | What is the course record of the marathon held in {place}? | time
    The telephone exchange of {place} can be reached on extension {ext}. | Which extension connects a caller to the telephone exchange in {place}? | ext
    The summit of Mount {place} rises {height} metres above the sea. | How high above sea level is the top of Mount {place}? | height
    The lending library of {place} owns {books} books. | How many books are in the collection of the library at {place}? | books
"""
_DATE_TABLE = """
    The covered market of {place} first opened its doors on {date}. | On what date did the market hall in {place} open for the first time? | date
    The treaty of {place} was signed on {date}. | When was the treaty of {place} signed? Give the full date. | date
    The great flood of {place} reached its peak on {date}. | On which day did the flood at {place} peak? | date
    The first tram in {place} ran on {date}. | On what date did trams start running in {place}? | date
"""


def _singles(table: str) -> tuple[_Single, ...]:
    return tuple(_Single(*(p.strip() for p in line.split(" | "))) for line in table.strip().splitlines())


_NUMBER = _singles(_NUMBER_TABLE)
_DATE = _singles(_DATE_TABLE)


@dataclass(frozen=True)
class _Pair:
    fact_a: str
    fact_b: str
    question: str
    keys: tuple[str, ...]  # fields that answer; all are needed


# Conjunctions need both values; bridges need fact A to find who fact B is about.
_PAIRS = (
    _Pair("The upper half of the {place} flag is {color}.", "The lower half of the {place} flag is {color2}.",
          "What are the two colours of the flag of {place}?", ("color", "color2")),
    _Pair("The {place} orchestra rehearses every {day}.", "On {day2} evenings the {place} orchestra performs in the town hall.",
          "On which two weekdays does the orchestra of {place} meet, to rehearse and to perform?", ("day", "day2")),
    _Pair("The {place} observatory is directed by {person}.", "{person} was born in the port town of {town}.",
          "In which town was the director of the {place} observatory born?", ("town",)),
    _Pair("The keys of the {place} archive are kept by {person}.", "{person} lives on {street} Street.",
          "On which street does the keeper of the {place} archive keys live?", ("street",)),
)  # fmt: skip

_ONSETS = ("Ka", "Vel", "Dru", "Or", "Syl", "Ba", "Tre", "Mo", "Quel", "Ish", "Ren", "Gal", "Ath", "Pol", "Zem", "Ul")
_MIDDLES = ("ra", "ven", "di", "lo", "mar", "ne", "sta", "qui")
_CODAS = ("nth", "dor", "vik", "mere", "burg", "lin", "set", "worth", "ac", "holm", "rey", "ton")
_FIRST = ("Agnes", "Bertil", "Clara", "Dmitri", "Elin", "Fabian", "Ines", "Jasper", "Katja", "Lorcan", "Mila",
          "Nils", "Orla", "Piet", "Runa", "Sven", "Tilde", "Viggo")  # fmt: skip
_LAST = ("Ambergast", "Birchwood", "Coldbrook", "Dunmore", "Eastwick", "Fairholm", "Greaves", "Hartigan",
         "Ivarsen", "Kettleby", "Lindqvist", "Mossgrove", "Northcote", "Oldfield")  # fmt: skip
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_COLORS = ("teal", "ochre", "crimson", "violet", "amber", "silver", "olive", "indigo")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class _Names:
    """Fictional names, unique within one generator call."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def place(self) -> str:
        return self._unique(lambda: self.rng.choice(_ONSETS) + self.rng.choice(_MIDDLES) + self.rng.choice(_CODAS))

    def person(self) -> str:
        return self._unique(lambda: f"{self.rng.choice(_FIRST)} {self.rng.choice(_LAST)}")

    def _unique(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise ValueError("ran out of distinct names; ask for fewer cases")


def _values(rng: random.Random, names: _Names, templates: Sequence[str]) -> dict[str, str]:
    """Values for every field; names only for the fields `templates` use (names are scarce)."""
    day = rng.randint(1, 28)
    month = rng.choice(_MONTHS)
    year = rng.randint(1712, 1968)
    colors = rng.sample(_COLORS, 2)
    days = rng.sample(_DAYS, 2)
    return {
        "year": str(rng.randint(1640, 1910)),
        "steps": str(rng.randint(90, 480)),
        "volume": f"{rng.randint(120, 9_800) * 1000:,}",
        "price": str(rng.randint(3, 95)),
        "time": f"2:{rng.randint(3, 59):02d}:{rng.randint(0, 59):02d}",
        "ext": str(rng.randint(2000, 89999)),
        "height": f"{rng.randint(800, 4800):,}",
        "books": f"{rng.randint(2_000, 95_000):,}",
        "date": f"{day} {month} {year}",
        "date_us": f"{month} {day}, {year}",
        "color": colors[0],
        "color2": colors[1],
        "day": days[0],
        "day2": days[1],
        "person": names.person() if any("{person}" in t for t in templates) else "",
        "town": names.place() if any("{town}" in t for t in templates) else "",
        "street": names.place() if any("{street}" in t for t in templates) else "",
    }


def _accepted(key: str, values: dict[str, str]) -> tuple[str, ...]:
    if key == "date":
        return values["date"], values["date_us"]
    if key in ("day", "day2"):
        return values[key], values[key] + "s"  # "on Fridays"
    return (values[key],)


def make_fact_cases(
    n: int = 120,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    positions: Sequence[str] = POSITIONS,
    sizes: Sequence[int] = SIZES,
    min_chars: int = 300,
    max_chars: int = 700,
) -> list[FactCase]:
    """`n` cases; case k has kind kinds[k % K], position positions[(k // K) % P], size
    sizes[(k // (K P)) % S], and a decoy when (k // (K P S)) is odd. Passages within a case come
    from different help topics and are at most ~1.5 * max_chars long."""
    if not kinds or any(k not in KINDS for k in kinds) or not positions or any(p not in POSITIONS for p in positions):
        raise ValueError(f"kinds must be from {KINDS} and positions from {POSITIONS}")
    if not sizes or min(sizes) < 2:
        raise ValueError("every size needs at least 2 chunks (two_facts uses two)")
    rng = random.Random(seed)
    names = _Names(rng)
    passages = [
        (t, p) for t, p in topic_passages(min_chars, max_chars) if min_chars // 2 <= len(p) <= 3 * max_chars // 2
    ]
    cases = []
    for k in range(n):
        kind = kinds[k % len(kinds)]
        position = positions[(k // len(kinds)) % len(positions)]
        size = sizes[(k // (len(kinds) * len(positions))) % len(sizes)]
        has_decoy = (k // (len(kinds) * len(positions) * len(sizes))) % 2 == 1 and size >= 3
        picked: list[tuple[str, str]] = []
        while len(picked) < size:
            topic, text = rng.choice(passages)
            if all(topic != t for t, _ in picked):
                picked.append((topic, text))
        texts = [p for _, p in picked]
        first = 0 if position == "first" else size - 1
        free = [i for i in range(size) if i != first]
        templates: tuple[str, ...]
        keys: tuple[str, ...]
        if kind == "two_facts":
            pair = _PAIRS[(k // len(kinds)) % len(_PAIRS)]
            templates, question_t, keys = (pair.fact_a, pair.fact_b), pair.question, pair.keys
            slots: tuple[int, ...] = (first, rng.choice(free))
        else:
            table = _NUMBER if kind == "number" else _DATE
            single = table[(k // len(kinds)) % len(table)]
            templates, question_t, keys = (single.fact,), single.question, (single.key,)
            slots = (first,)
        v = {"place": names.place(), **_values(rng, names, templates)}
        facts = tuple(t.format(**v) for t in templates)
        for fact, slot in zip(facts, slots, strict=True):
            texts[slot] = plant_sentence(rng, texts[slot], fact)
        decoy = None
        if has_decoy:  # the first template about another place, with other answer values
            clash = [key for key in keys if "{" + key + "}" in templates[0]]  # answer values the decoy states
            other = {"place": names.place(), **_values(rng, names, templates[:1])}
            while any(other[key] == v[key] for key in clash):
                other = {**_values(rng, names, ()), "place": other["place"], "person": other["person"]}
            slot = rng.choice([i for i in range(size) if i not in slots])
            decoy = templates[0].format(**other)
            texts[slot] = plant_sentence(rng, texts[slot], decoy)
        cases.append(
            FactCase(
                case_id=f"fact{k:04d}",
                kind=kind,
                question=question_t.format(**v),
                answers=tuple(v[key] for key in keys),
                accepted=tuple(_accepted(key, v) for key in keys),
                chunks=tuple(texts),
                fact_chunks=slots,
                fact_sentences=facts,
                position=position,
                decoy_sentence=decoy,
            )
        )
    return cases


def as_retrieval_case(case: FactCase) -> PlantedCase:
    """The case as a retrieval question over its own chunks (one document each): the gold is the
    chunk holding the first needed fact (a bridge's second fact names no place, so the question
    alone cannot find it). For `evaluation.retrieval_quality`, which judges a hit by `answer in text`."""
    docs = [
        Document(
            doc_id=f"{case.case_id}/c{i}",
            text=text,
            source_path=f"facts/{case.case_id}/c{i}.md",
            metadata={"case_id": case.case_id},
        )
        for i, text in enumerate(case.chunks)
    ]
    return PlantedCase(
        case_id=case.case_id,
        question=case.question,
        answer=case.fact_sentences[0],
        fact_sentence=case.fact_sentences[0],
        docs=docs,
        answer_doc_id=docs[case.fact_chunks[0]].doc_id,
    )
