# ruff: noqa: E501  (the template table below is data, one row per line)
"""Planted-fact QA cases: real passages with one synthetic, checkable fact inserted.

Each case holds a few documents cut from the Python help topics (`corpus.topic_passages`).
One of them carries a fact sentence about a fictional entity, e.g. "The access code for
the Vellmar archive is 4821."; the question asks for that value. The answer cannot come
from a model's prior knowledge, so it measures retrieval and, downstream, whether KV reuse
preserved what the model reads from context. Optionally a distractor carries a decoy fact
(same template, different entity and value).

Everything is drawn from one seeded RNG: the same (n, seed, Python version) gives the same
cases. Entity names are unique across the cases of one call, so a combined corpus of all
cases has exactly one document that answers each question.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redknot_rag.evaluation.corpus import topic_passages
from redknot_rag.retrieval.parser import Document


@dataclass(frozen=True)
class PlantedCase:
    """One question whose answer is planted in `docs[answer_doc_index]`."""

    case_id: str
    question: str
    answer: str
    fact_sentence: str
    docs: list[Document]
    answer_doc_id: str

    @property
    def answer_doc(self) -> Document:
        return next(d for d in self.docs if d.doc_id == self.answer_doc_id)


@dataclass(frozen=True)
class _Template:
    fact: str
    question: str
    answer: str


# One template per line: fact | question | answer. {place} is a fictional place name; the
# other fields come from _values().
_TEMPLATE_TABLE = """
    The access code for the {place} archive is {code}. | What is the access code for the {place} archive? | {code}
    The chief archivist of the {place} library is {person}. | Who is the chief archivist of the {place} library? | {person}
    The {place} ferry departs from pier {pier}. | From which pier does the {place} ferry depart? | {pier}
    The {place} lantern festival is held every year in {month}. | In which month is the {place} lantern festival held? | {month}
    The lighthouse at {place} is painted {color}. | What color is the lighthouse at {place} painted? | {color}
    The village of {place} has a population of {pop}. | What is the population of the village of {place}? | {pop}
    The {place} observatory was founded in {year}. | In what year was the {place} observatory founded? | {year}
    The mascot of the {place} rowing club is a {animal}. | What animal is the mascot of the {place} rowing club? | {animal}
    The {place} bakery is famous for its {pastry}. | What is the {place} bakery famous for? | {pastry}
    The bridge over the {place} river is {length} meters long. | How long is the bridge over the {place} river? | {length} meters
    The founder of the {place} chess society was {person}. | Who founded the {place} chess society? | {person}
    The {place} botanical garden grows a rare {flower}. | Which rare flower grows in the {place} botanical garden? | {flower}
    The night train to {place} leaves from platform {pier}. | From which platform does the night train to {place} leave? | {pier}
    The {place} choir sings only in {language}. | In which language does the {place} choir sing? | {language}
    The {place} museum keeps a meteorite weighing {weight} kilograms. | How much does the meteorite in the {place} museum weigh? | {weight} kilograms
    The password of the {place} radio station is {word}. | What is the password of the {place} radio station? | {word}
"""
_TEMPLATES = tuple(
    _Template(*(part.strip() for part in line.split(" | "))) for line in _TEMPLATE_TABLE.strip().splitlines()
)

_ONSETS = ("Vell", "Dor", "Kast", "Mir", "Thal", "Brun", "Quen", "Zar", "Hollo", "Fen", "Grim", "Ost",
           "Lys", "Var", "Cor", "Eld", "Nor", "Pell", "Riv", "Sund", "Tarn", "Ulm", "Wyn", "Yar")  # fmt: skip
_CODAS = ("mar", "wick", "heim", "ora", "stead", "moor", "vale", "ford", "brecht", "dell", "gard", "holt",
          "anth", "ios", "ek", "wen", "by", "ness", "rin", "tor")  # fmt: skip
_FIRST = ("Ilsa", "Tomas", "Brigid", "Oskar", "Maren", "Caspian", "Odile", "Laszlo", "Petra", "Anselm",
          "Greta", "Rafe", "Solveig", "Emeric", "Hedda", "Jovan")  # fmt: skip
_LAST = ("Quillfeather", "Marrowby", "Denholt", "Ashcombe", "Varga", "Thornquist", "Pellworth",
         "Oakridge", "Skarsgard", "Brannock", "Hallowell", "Ferncastle")  # fmt: skip
_VALUES: dict[str, tuple[str, ...]] = {
    "month": ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"),
    "color": ("crimson", "teal", "ochre", "violet", "emerald green", "amber", "cobalt blue", "silver"),
    "animal": ("heron", "badger", "otter", "lynx", "falcon", "tortoise", "walrus", "stag"),
    "pastry": ("cardamom buns", "plum tarts", "honey cakes", "almond croissants", "rye pretzels"),
    "flower": ("blue orchid", "black tulip", "ghost lily", "snow poppy", "fire iris"),
    "language": ("Latin", "Icelandic", "Welsh", "Basque", "Esperanto", "Finnish"),
    "word": ("marigold", "quicksilver", "tamarind", "bluebird", "lodestone", "juniper", "saffron"),
}  # fmt: skip


def _values(rng: random.Random) -> dict[str, str]:
    v = {k: rng.choice(opts) for k, opts in _VALUES.items()}
    v["code"] = str(rng.randint(1000, 9999))
    v["person"] = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    v["pier"] = str(rng.randint(2, 48))
    v["pop"] = f"{rng.randint(120, 9800):,}"
    v["year"] = str(rng.randint(1712, 1968))
    v["length"] = str(rng.randint(40, 900))
    v["weight"] = str(rng.randint(3, 250))
    return v


def _place(rng: random.Random, used: set[str]) -> str:
    while True:
        name = rng.choice(_ONSETS) + rng.choice(_CODAS)
        if name not in used:
            used.add(name)
            return name


def plant_sentence(rng: random.Random, passage: str, sentence: str) -> str:
    """Insert `sentence` after a prose paragraph (one ending in '.'), else as its own paragraph."""
    paragraphs = passage.split("\n\n")
    prose = [i for i, p in enumerate(paragraphs) if p.rstrip().endswith(".") and not p.startswith(" ")]
    if prose:
        i = rng.choice(prose)
        paragraphs[i] = paragraphs[i].rstrip() + " " + sentence
    else:
        paragraphs.insert(rng.randint(0, len(paragraphs)), sentence)
    return "\n\n".join(paragraphs)


def make_planted_cases(
    n: int = 120,
    seed: int = 0,
    num_distractors: int = 3,
    is_decoy: bool = False,
    min_chars: int = 400,
    max_chars: int = 1200,
) -> list[PlantedCase]:
    """`n` cases of 1 + num_distractors documents each; passages within a case come from
    different topics. `is_decoy`: the first distractor gets a same-template decoy fact."""
    if n > len(_ONSETS) * len(_CODAS) // (2 if is_decoy else 1):
        raise ValueError(f"n={n} exceeds the number of distinct place names")
    rng = random.Random(seed)
    passages = [(t, p) for t, p in topic_passages(min_chars, max_chars) if len(p) >= min_chars // 2]
    used: set[str] = set()
    cases = []
    for k in range(n):
        case_id = f"case{k:04d}"
        template = _TEMPLATES[k % len(_TEMPLATES)]
        picked: list[tuple[str, str]] = []
        while len(picked) < 1 + num_distractors:
            topic, text = rng.choice(passages)
            if all(topic != t for t, _ in picked):
                picked.append((topic, text))
        fields = {"place": _place(rng, used), **_values(rng)}
        fact = template.fact.format(**fields)
        texts = [plant_sentence(rng, picked[0][1], fact)] + [p for _, p in picked[1:]]
        if is_decoy and num_distractors > 0:
            decoy = template.fact.format(**{**_values(rng), "place": _place(rng, used)})
            texts[1] = plant_sentence(rng, texts[1], decoy)
        order = list(range(len(texts)))
        rng.shuffle(order)  # the answer doc's position within the case is random
        docs = []
        answer_doc_id = ""
        for slot, j in enumerate(order):
            doc_id = f"{case_id}/doc{slot}"
            if j == 0:
                answer_doc_id = doc_id
            docs.append(
                Document(
                    doc_id=doc_id,
                    text=texts[j],
                    source_path=f"planted/{case_id}/doc{slot}.md",
                    metadata={"case_id": case_id, "topic": picked[j][0]},
                )
            )
        cases.append(
            PlantedCase(
                case_id=case_id,
                question=template.question.format(**fields),
                answer=template.answer.format(**fields),
                fact_sentence=fact,
                docs=docs,
                answer_doc_id=answer_doc_id,
            )
        )
    return cases


def corpus_documents(cases: Sequence[PlantedCase]) -> list[Document]:
    """All cases' documents in one list (doc ids are unique across cases)."""
    return [d for c in cases for d in c.docs]


def write_planted_corpus(cases: Sequence[PlantedCase], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `corpus.jsonl` (one document per line: id, text, metadata) and `cases.jsonl`
    (case_id, question, answer, fact_sentence, answer_doc_id, doc_ids). Returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus_path, cases_path = out / "corpus.jsonl", out / "cases.jsonl"
    with corpus_path.open("w", encoding="utf-8") as f:
        for d in corpus_documents(cases):
            f.write(json.dumps({"id": d.doc_id, "text": d.text, "metadata": dict(d.metadata)}) + "\n")
    with cases_path.open("w", encoding="utf-8") as f:
        for c in cases:
            row = {
                "case_id": c.case_id,
                "question": c.question,
                "answer": c.answer,
                "fact_sentence": c.fact_sentence,
                "answer_doc_id": c.answer_doc_id,
                "doc_ids": [d.doc_id for d in c.docs],
            }
            f.write(json.dumps(row) + "\n")
    return corpus_path, cases_path
