"""Head-profile calibration data: both case generators, seeds the fidelity harness never uses."""

from redknot_rag.evaluation.harness import fact_cases
from redknot_rag.rag.profiling import calibration_prompts


def test_calibration_mixes_both_generators_deterministically():
    a = calibration_prompts(6, seed=0)
    assert a == calibration_prompts(6, seed=0)
    assert len(a) == 6
    # planted prompts (6 chunks, one fact) alternate with `facts` prompts (4/6/8 chunks, 1-2 facts)
    assert [len(p.chunks) for p in a[::2]] == [6, 6, 6]
    assert all(len(p.fact_sentences) >= 1 for p in a)
    for p in a:  # every fact sentence is in one of the prompt's chunks
        assert all(any(s in c for c in p.chunks) for s in p.fact_sentences)


def test_calibration_never_sees_the_harness_cases():
    harness = {c.question for c in fact_cases(40, seed=0)}
    assert not harness & {p.question for p in calibration_prompts(40, seed=0)}
