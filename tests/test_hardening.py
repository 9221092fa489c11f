"""Hardening (issue 13): bad input never fails other requests and always answers 4xx.

Unit level here (sampling validation, policy names, per-request failure isolation in the engine);
the HTTP level (tenancy, drain, limits, the schemathesis run) is further down and in test_server.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from redknot_rag.reuse import make_policy
from redknot_rag.sampling import InvalidRequestError, SamplingParams


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"frequency_penalty": math.nan},
        {"presence_penalty": -math.inf},
        {"top_p": math.nan},
        {"min_p": math.nan},
        {"repetition_penalty": math.inf},
        {"seed": 2**70},
        {"seed": -1},
        {"n": 0},
        {"n": -1},
        {"max_new_tokens": 1.5},
        {"stop_token_ids": (-3,)},
    ],
)
def test_sampling_params_reject_non_finite_and_out_of_range(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw).validate()


@pytest.mark.parametrize(
    "name", ["bogus", "epic:-1", "cacheblend:5", "redknot:nan", "redknot-local:0.1:-4:-9", "full:1", "epic:x"]
)
def test_bad_policy_names_raise_value_error(name):
    with pytest.raises(ValueError, match="reuse policy"):
        make_policy(name)


@pytest.mark.parametrize("name", ["full", "naive", "epic", "epic:0", "cacheblend:0.2", "redknot:0.1:4:32"])
def test_good_policy_names(name):
    assert make_policy(name).name == name.split(":")[0]


def test_poisoned_request_fails_alone_in_its_batch(engine):
    """A logits processor that raises (as a broken constraint would) fails its own request; the three
    requests batched with it in the same steps finish normally, and no KV page is leaked."""
    free = engine.runner.allocator.num_free
    good = [engine.make_request([1, 2, 3, 4 + i], SamplingParams(max_new_tokens=4)) for i in range(3)]
    bad = engine.make_request([1, 2, 3, 9], SamplingParams(max_new_tokens=4, temperature=0.7))

    def poison(req, logits: torch.Tensor) -> torch.Tensor:
        return logits * math.nan  # softmax → NaN probabilities: torch.multinomial raises

    bad.logits_processor = poison  # type: ignore[attr-defined]
    for r in [good[0], bad, *good[1:]]:
        engine.submit(r)
    for _ in range(50):
        if all(r.is_finished for r in [*good, bad]):
            break
        engine.step()
    assert bad.is_finished and bad.error and "RuntimeError" in bad.error
    for r in good:
        assert r.error is None and len(r.output_ids) == 4, (r.error, r.output_ids)
    assert engine.runner.allocator.num_free == free
