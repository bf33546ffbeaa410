"""Checks run before any model loads: each problem names its key and the fix."""

from __future__ import annotations

import pytest
import torch

from conftest import write_config
from dittune.config import load_config
from dittune.train.preflight import device_checks, preflight


@pytest.fixture
def config(tmp_path, tiny_models, dataset):
    path = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run")
    return lambda *overrides: load_config(path, overrides)


def _keys(problems: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in problems]


def test_valid_config_has_no_problems(config):
    assert preflight(config()) == []


def test_unknown_family_suggests_the_close_one(config):
    problems = preflight(config("model.family=hunyuan-dt"))
    assert _keys(problems) == ["model.family"]
    assert "hunyuan-dit" in problems[0][1]


def test_paths_and_model_folder(config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = preflight(config(f"model.path={empty}", f"data.path={tmp_path / 'nowhere'}"))
    assert set(_keys(problems)) == {"model.path", "data.path"}
    assert any("model_index.json" in message for _, message in problems)


def test_family_alignment_and_encoder_names(config):
    problems = dict(
        preflight(
            config(
                "data.bucket_step=40",
                "train.caption_dropout_per_encoder={clip = 0.1, t5 = 0.2, llama = 0.3}",
            )
        )
    )
    assert "use 48" in problems["data.bucket_step"]
    assert (
        "'clip', 't5'" in problems["train.caption_dropout_per_encoder.llama"]
        or "clip" in problems["train.caption_dropout_per_encoder.llama"]
    )
    assert "train.caption_dropout_per_encoder.clip" not in problems


def test_validation_sizes_are_snapped_not_refused(config):
    from dittune.train.prepare import validation_size

    cfg = config("validation.width=100", "validation.height=70")
    assert preflight(cfg) == []
    assert validation_size(cfg, 16) == (96, 64)
    assert validation_size(cfg, 64) == (128, 64)


def test_loss_options_and_text_length_the_family_does_not_use(config):
    problems = dict(
        preflight(config('loss.timestep_sampling="logit_normal"', 'loss.weighting="cosmap"', "model.t5_max_length=300"))
    )
    assert "does not use this option" in problems["loss.timestep_sampling"]
    assert "min_snr_gamma" in problems["loss.weighting"]  # lists the options Hunyuan-DiT does use
    assert "fixed" in problems["model.t5_max_length"]
    assert preflight(config("loss.vlb=true", "loss.min_snr_gamma=5.0")) == []


def test_precision_combinations(config):
    assert preflight(config("train.mixed_precision=fp16")) == []  # fp16 depends on the device: device_checks
    problems = dict(device_checks(config("train.mixed_precision=fp16"), "cpu"))
    assert "CUDA" in problems["train.mixed_precision"]  # accelerate would silently run fp16 as fp32 on CPU
    assert device_checks(config("train.mixed_precision=fp16"), "cuda") == []
    problems = dict(device_checks(config("model.weight_dtype=fp16", "train.mixed_precision=fp16"), "cpu"))
    assert set(problems) == {"train.mixed_precision", "model.weight_dtype"}
    problems = dict(preflight(config("model.weight_dtype=bf16", "train.mixed_precision=no")))
    assert "autocast" in problems["model.weight_dtype"]
    problems = dict(preflight(config("model.weight_dtype=bf16", "train.mixed_precision=fp16")))
    assert "cannot be computed under fp16" in problems["model.weight_dtype"]
    assert preflight(config("model.weight_dtype=bf16", "train.mixed_precision=bf16")) == []
    assert preflight(config("model.weight_dtype=bf16", "train.mixed_precision=auto")) == []  # auto: bf16


def test_train_refuses_fp16_on_cpu_before_loading_anything(config, monkeypatch):
    from dittune.config.errors import ConfigError
    from dittune.train import runner, setup

    monkeypatch.setattr(setup, "training_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(setup, "make_accelerator", lambda *a: pytest.fail("must not get this far"))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        runner.run_train(config("train.mixed_precision=fp16"), progress=False)


def test_train_refuses_before_loading_anything(config, tmp_path):
    from dittune.config.errors import ConfigError
    from dittune.train.runner import run_train

    cfg = config("data.bucket_step=40")
    with pytest.raises(ConfigError, match=r"data\.bucket_step"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()
