"""evaluation.fact_cases: the second (paraphrased, multi-fact) case generator."""

from __future__ import annotations

import pytest

from redknot_rag.evaluation.fact_cases import KINDS, make_fact_cases, normalize_answer


def test_fact_cases_deterministic_and_balanced() -> None:
    cases = make_fact_cases(72, seed=5)
    assert cases == make_fact_cases(72, seed=5) and cases != make_fact_cases(72, seed=6)
    assert len({c.question for c in cases}) == 72
    grid = {(c.kind, c.position, c.num_chunks, c.has_decoy) for c in cases}
    assert len(grid) == 3 * 2 * 3 * 2  # every kind x position x size, with and without a decoy
    for c in cases:
        # each needed fact sits in exactly its chunk, and nowhere else
        for fact, slot in zip(c.fact_sentences, c.fact_chunks, strict=True):
            assert [i for i, t in enumerate(c.chunks) if fact in t] == [slot]
        assert c.fact_chunks[0] == (0 if c.position == "first" else c.num_chunks - 1)
        assert len(set(c.fact_chunks)) == len(c.fact_chunks) == (2 if c.kind == "two_facts" else 1)
        # the question paraphrases: it never contains a fact sentence's wording up to the answer
        assert all(f.split(" ", 4)[-1][:25] not in c.question for f in c.fact_sentences)
        # the gold answers pass their own checker; the fact sentences alone state them
        assert c.is_correct(" and ".join(c.answers))
        assert c.is_correct(" ".join(c.fact_sentences))
    assert {c.kind for c in cases} == set(KINDS)


def test_fact_case_checker() -> None:
    cases = make_fact_cases(36, seed=0)
    date = next(c for c in cases if c.kind == "date")
    day, month, year = date.answers[0].split()
    assert date.is_correct(f"It opened on {month} {day}th, {year}.")
    assert not date.is_correct(f"It opened in {month} {year}.")
    pair = next(c for c in cases if c.kind == "two_facts" and len(c.answers) == 2)
    assert pair.is_correct(f"{pair.answers[1].upper()} and {pair.answers[0]}")
    assert not pair.is_correct(pair.answers[0])  # one of two facts is not enough
    big = next(c for c in cases if c.kind == "number" and "," in c.answers[0])
    assert big.is_correct(big.answers[0].replace(",", ""))  # thousands separators are optional
    num = next(c for c in cases if c.kind == "number" and c.answers[0].isdigit())
    assert not num.is_correct(num.answers[0] + "7")  # whole numbers only
    assert normalize_answer("The 3rd of May, 1,250 km!") == "the 3 of may 1250 km"


def test_fact_cases_decoys_state_other_values() -> None:
    for c in make_fact_cases(72, seed=1):
        if not c.has_decoy:
            continue
        assert c.decoy_sentence is not None and c.decoy_sentence != c.fact_sentences[0]
        holders = [i for i, t in enumerate(c.chunks) if c.decoy_sentence in t]
        assert len(holders) == 1 and holders[0] not in c.fact_chunks
        if c.kind != "two_facts":  # the decoy's value is not the answer
            assert sum(c.is_correct(t) for t in c.chunks) == 1


def test_fact_cases_bad_args() -> None:
    with pytest.raises(ValueError):
        make_fact_cases(4, kinds=("nope",))
    with pytest.raises(ValueError):
        make_fact_cases(4, sizes=(1,))


def test_fact_cases_as_retrieval_questions() -> None:
    from redknot_rag.evaluation.fact_cases import as_retrieval_case

    cases = make_fact_cases(12, seed=2)
    for fc, rc in zip(cases, map(as_retrieval_case, cases), strict=True):
        assert [d.text for d in rc.docs] == list(fc.chunks) and rc.question == fc.question
        assert rc.answer in rc.answer_doc.text and rc.answer_doc.text == fc.chunks[fc.fact_chunks[0]]
    assert len({d.doc_id for fc in cases for d in as_retrieval_case(fc).docs}) == sum(c.num_chunks for c in cases)
