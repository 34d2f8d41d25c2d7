"""Sampling from the GPU's candidates: exact where it can be, a full read where it must."""

from __future__ import annotations

import asyncio
import math

import pytest

from pyengine.errors import RequestError
from pyengine.sampling import Candidates, Sampler, SamplingParams


def cands(values, bound=-1e30):
    top = sorted(((v, i) for i, v in enumerate(values)), key=lambda e: (-e[0], e[1]))
    mx = top[0][0]
    return Candidates(top, mx, sum(math.exp(v - mx) for v in values), bound)


def pick(params, c, full=None):
    async def read_all():
        read_all.called = True
        return full
    read_all.called = False
    tok = asyncio.run(Sampler(params).pick(c, read_all))
    return tok, read_all.called


def test_greedy_takes_the_first_candidate():
    assert pick(SamplingParams(temperature=0.0), cands([1.0, 3.0, 3.0, 2.0]))[0] == 1


def test_top_p_keeps_the_smallest_nucleus():
    values = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    seen = set()
    for seed in range(200):
        tok, full = pick(SamplingParams(temperature=1.0, top_p=0.75, seed=seed), cands(values))
        seen.add(tok)
        assert not full
    assert seen == {0, 1}


def test_candidates_below_the_bound_force_a_full_read():
    # only the first candidate is certain; top_p needs more, so the sampler reads every logit
    values = [0.0, -0.1, -0.2]
    c = cands(values[:2], bound=-0.15)
    c.z = sum(math.exp(v) for v in values)
    tok, full = pick(SamplingParams(temperature=1.0, top_p=1.0, seed=0), c, full=values)
    assert full and tok in (0, 1, 2)


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", -0.1), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -1), ("top_k", 2.5), ("max_tokens", 0),
    ("max_tokens", True), ("seed", 1.5), ("presence_penalty", 3.0), ("frequency_penalty", float("inf")),
    ("repetition_penalty", 0.0), ("stop", [""]), ("stop", ["a"] * 17), ("stop", 5),
])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


def test_stop_accepts_one_string():
    assert SamplingParams(stop="###").stop == ["###"]
