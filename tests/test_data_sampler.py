"""Bucket batch sampler: coverage, determinism, dropping, flips and exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from dittune.data.sampler import BucketBatchSampler

BUCKETS = {
    (512, 512): [0, 3, 4, 7, 8, 9, 10],
    (768, 512): [1, 5, 11, 12, 13],
    (512, 768): [2, 6],
}
BUCKET_OF = {index: bucket for bucket, indices in BUCKETS.items() for index in indices}


def flatten(batches: list[list[tuple[int, bool]]]) -> list[int]:
    return [index for batch in batches for index, _ in batch]


@pytest.mark.parametrize("repeats", [1, 3])
def test_every_sample_appears_once_per_epoch_per_repeat(repeats: int) -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0, repeats=repeats)
    for epoch in range(3):
        batches = sampler.global_batches(epoch)
        assert Counter(flatten(batches)) == {index: repeats for index in BUCKET_OF}
        assert len(batches) == sampler.batches_per_epoch


def test_batches_are_single_bucket_and_at_most_batch_size() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=5, random_flip=True)
    batches = sampler.global_batches(0)
    assert sampler.batches_per_epoch == 3 + 2 + 1
    for batch in batches:
        assert 1 <= len(batch) <= 3
        assert len({BUCKET_OF[index] for index, _ in batch}) == 1


def test_same_seed_same_order_and_epochs_and_seeds_differ() -> None:
    first = BucketBatchSampler(BUCKETS, batch_size=2, seed=1, random_flip=True)
    second = BucketBatchSampler(BUCKETS, batch_size=2, seed=1, random_flip=True)
    other_seed = BucketBatchSampler(BUCKETS, batch_size=2, seed=2, random_flip=True)
    assert first.global_batches(4) == second.global_batches(4)
    assert first.global_batches(0) != first.global_batches(1)
    assert first.global_batches(0) != other_seed.global_batches(0)


def test_no_shuffle_keeps_a_stable_order() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0, shuffle=False)
    batches = sampler.global_batches(0)
    assert sampler.global_batches(1) == batches
    assert flatten(batches) == [0, 3, 4, 7, 8, 9, 10, 2, 6, 1, 5, 11, 12, 13]  # buckets sorted by size
    assert all(not flip for batch in batches for _, flip in batch)


def test_drop_incomplete_removes_partial_batches() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0, drop_incomplete=True)
    batches = sampler.global_batches(0)
    assert sampler.batches_per_epoch == len(batches) == 2 + 1
    assert all(len(batch) == 3 for batch in batches)
    used = Counter(BUCKET_OF[index] for index in flatten(batches))
    assert used == {(512, 512): 6, (768, 512): 3}


def test_drop_incomplete_with_no_full_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="no full batch of 8"):
        BucketBatchSampler(BUCKETS, batch_size=8, seed=0, drop_incomplete=True)


def test_random_flip_draws_both_ways_per_sample_and_epoch() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0, random_flip=True, repeats=10)
    flips = [flip for epoch in range(2) for batch in sampler.global_batches(epoch) for _, flip in batch]
    assert 0.35 < sum(flips) / len(flips) < 0.65
    no_flip = BucketBatchSampler(BUCKETS, batch_size=2, seed=0, repeats=10)
    assert not any(flip for batch in no_flip.global_batches(0) for _, flip in batch)


def test_next_batch_walks_through_epochs() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=3)
    per_epoch = sampler.batches_per_epoch
    taken = [sampler.next_batch() for _ in range(per_epoch + 2)]
    assert [epoch for epoch, _ in taken] == [0] * per_epoch + [1, 1]
    assert [batch for _, batch in taken[:per_epoch]] == sampler.global_batches(0)
    assert [batch for _, batch in taken[per_epoch:]] == sampler.global_batches(1)[:2]


@pytest.mark.parametrize("split", [1, 5, 6, 7, 13])
def test_resume_continues_the_identical_sequence(split: int) -> None:
    settings = {"batch_size": 2, "seed": 11, "random_flip": True, "repeats": 2}
    straight = BucketBatchSampler(BUCKETS, **settings)
    expected = [straight.next_batch() for _ in range(30)]

    before = BucketBatchSampler(BUCKETS, **settings)
    first_part = [before.next_batch() for _ in range(split)]
    state = before.state_dict()
    resumed = BucketBatchSampler(BUCKETS, **settings)
    resumed.load_state_dict(state)
    second_part = [resumed.next_batch() for _ in range(30 - split)]

    assert first_part + second_part == expected


def test_state_at_an_epoch_boundary_points_to_the_next_epoch() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=7, seed=0)
    for _ in range(sampler.batches_per_epoch):
        sampler.next_batch()
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    assert state["seed"] == 0


def test_changed_dataset_cannot_resume() -> None:
    state = BucketBatchSampler(BUCKETS, batch_size=2, seed=0).state_dict()
    changed = {**BUCKETS, (512, 512): [*BUCKETS[(512, 512)], 14]}
    with pytest.raises(ValueError, match="bucket layout changed"):
        BucketBatchSampler(changed, batch_size=2, seed=0).load_state_dict(state)


def test_changed_settings_or_seed_cannot_resume() -> None:
    state = BucketBatchSampler(BUCKETS, batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="global_batch 2 → 3"):
        BucketBatchSampler(BUCKETS, batch_size=3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 0"):
        BucketBatchSampler(BUCKETS, batch_size=2, seed=1).load_state_dict(state)


def _split_positions(**split: int) -> list[dict[int, tuple[int, bool]]]:
    """Per step of epoch 0: {position in the global batch: item}, gathered over every process and micro-batch."""
    world = split.pop("world", 1)
    samplers = [
        BucketBatchSampler(BUCKETS, seed=4, random_flip=True, drop_incomplete=True, rank=r, world=world, **split)
        for r in range(world)
    ]
    steps: list[dict[int, tuple[int, bool]]] = []
    for parts in zip(*(s.epoch_batches(0) for s in samplers)):
        step: dict[int, tuple[int, bool]] = {}
        for micro in (m for process in parts for m in process):
            assert len(micro.items) == len(micro.positions) == split["batch_size"]
            step.update(zip(micro.positions, micro.items))
        steps.append(step)
    return steps


def test_every_split_of_a_global_batch_gives_each_sample_the_same_position() -> None:
    whole = _split_positions(batch_size=4)
    assert len(whole) == BucketBatchSampler(BUCKETS, batch_size=4, seed=4, drop_incomplete=True).batches_per_epoch
    for split in (
        dict(batch_size=2, world=2),
        dict(batch_size=2, accumulation=2),
        dict(batch_size=1, world=2, accumulation=2),
    ):
        assert _split_positions(**split) == whole, split


def test_micro_batches_of_one_process_are_consecutive_slices() -> None:
    buckets = {(512, 512): list(range(16))}
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0, shuffle=False, rank=1, world=2, accumulation=2)
    first = sampler.global_batches(0)[0]
    assert len(first) == 8
    micro = sampler.split(first)
    assert [m.positions for m in micro] == [[2, 3], [6, 7]]
    assert [m.items for m in micro] == [first[2:4], first[6:8]]
    with pytest.raises(ValueError, match="use next_step"):
        sampler.next_batch()
