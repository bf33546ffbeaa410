"""Caption dropout: decided per sample and per text encoder, replacing that encoder's outputs only."""

from __future__ import annotations

import pytest
import torch

from conftest import write_config
from dittune.cache.build import TEXT
from dittune.cache.store import CacheStore
from dittune.config import load_config
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec
from dittune.train.batches import CachedBatches, dropout_by_encoder
from dittune.train.prepare import EMPTY_PROMPT, fill_caches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_models):
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("dropout")
    data = make_dataset(root / "data", sizes=((64, 64),))
    cfg = load_config(write_config(root / "cfg.toml", tiny_models["v1.2"], data, root / "run"))
    spec = HunyuanDiTSpec(tiny_models["v1.2"])
    result, _ = fill_caches(
        cfg,
        spec,
        device=torch.device("cpu"),
        compute_dtype="fp32",
        keep_vae=False,
        progress=False,
        announce=lambda _: None,
    )
    return spec, CacheStore(cfg.cache_dir), result


def test_per_encoder_setting_overrides_the_common_one():
    slots = HunyuanDiTSpec.text_encoders
    assert dropout_by_encoder(0.1, {}, slots) == {"clip": 0.1, "t5": 0.1}
    assert dropout_by_encoder(0.1, {"t5": 0.5}, slots) == {"clip": 0.1, "t5": 0.5}


@pytest.mark.parametrize(("clip", "t5"), [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.0, 0.0)])
def test_dropped_encoder_gets_the_empty_caption_only(prepared, clip, t5):
    spec, store, data = prepared
    batches = CachedBatches(store, data, spec.text_encoders, {"clip": clip, "t5": t5}, torch.device("cpu"))
    items = [(i, False) for i in range(len(data.plan.samples))]
    batch = batches.collate(items, torch.Generator().manual_seed(0))
    empty = store.load(TEXT, data.text_keys[EMPTY_PROMPT])
    for row, (index, _) in enumerate(items):
        caption = store.load(TEXT, data.text_keys[data.plan.samples[index].record.caption])
        for slot, dropped in zip(spec.text_encoders, (clip, t5)):
            source = empty if dropped else caption
            for key in slot.keys:
                assert torch.equal(batch.text[key][row], source[key]), (slot.name, key)


def test_decisions_are_independent_per_encoder_and_seeded(prepared):
    spec, store, data = prepared
    batches = CachedBatches(store, data, spec.text_encoders, {"clip": 0.5, "t5": 0.5}, torch.device("cpu"))
    empty = store.load(TEXT, data.text_keys[EMPTY_PROMPT])

    def draw(generator: torch.Generator) -> list[tuple[bool, ...]]:
        result = []
        for _ in range(60):
            text = batches.collate([(0, False)], generator).text
            result.append(tuple(torch.equal(text[s.keys[0]][0], empty[s.keys[0]]) for s in spec.text_encoders))
        return result

    outcomes = draw(torch.Generator().manual_seed(1))
    assert {(True, False), (False, True), (True, True), (False, False)} <= set(outcomes)
    assert 15 < sum(clip for clip, _ in outcomes) < 45
    assert draw(torch.Generator().manual_seed(1)) == outcomes
