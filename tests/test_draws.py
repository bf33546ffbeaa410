"""Per-sample random draws: a sample's numbers depend on (seed, step, position) only, never on its batch-mates."""

from __future__ import annotations

import pytest
import torch

from dittune.models.draws import SampleDraws, SharedDraws, as_draws, sample_seed


def test_a_sample_draws_the_same_numbers_in_any_batch() -> None:
    shape = (3, 4, 5)
    together = SampleDraws(7, 11, [0, 1, 2, 3], "cpu")
    first, second = SampleDraws(7, 11, [0, 1], "cpu"), SampleDraws(7, 11, [2, 3], "cpu")
    for name, args in (("randn", ()), ("rand", ()), ("randint", (1000,))):
        whole = getattr(together, name)(*args, (4, *shape), device="cpu")
        halves = [getattr(d, name)(*args, (2, *shape), device="cpu") for d in (first, second)]
        assert torch.equal(whole, torch.cat(halves)), name


def test_draws_differ_by_seed_step_position_and_purpose() -> None:
    keys = {(s, t, p, u) for s in (0, 1) for t in (0, 1) for p in (0, 1) for u in ("noise", "caption")}
    assert len({sample_seed(*key) for key in keys}) == len(keys)
    a = SampleDraws(0, 0, [0, 1], "cpu").randn((2, 64), device="cpu")
    assert not torch.equal(a[0], a[1])
    assert all(0 <= sample_seed(-5, 3, 2, "noise") < 2**63 for _ in range(1))


def test_a_batch_shape_must_match_the_samples() -> None:
    with pytest.raises(ValueError, match="batch of 2"):
        SampleDraws(0, 0, [0, 1], "cpu").randn((3, 4), device="cpu")


def test_shared_draws_are_the_plain_generator_calls() -> None:
    draws = as_draws(torch.Generator().manual_seed(5))
    assert isinstance(draws, SharedDraws)
    reference = torch.Generator().manual_seed(5)
    assert torch.equal(draws.randn((2, 3), device="cpu"), torch.randn((2, 3), generator=reference))
    assert torch.equal(draws.randint(9, (4,), device="cpu"), torch.randint(0, 9, (4,), generator=reference))
    sample = SampleDraws(0, 0, [0], "cpu")
    assert as_draws(sample) is sample
