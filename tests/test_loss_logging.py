"""Loss, logged terms and grad norm stay on the device between logging steps, and are logged right at one."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FAMILIES, make_dataset, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

READ_BACKS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")
"""Tensor methods that hand a value to Python, i.e. wait for the tensor's device."""
PACKAGE = str(Path(__import__("dittune").__file__).parent)
CPU_BY_DESIGN = {("batches.py", "collate"), ("diffusion_objective.py", "from_betas")}
"""dittune call sites that read CPU tensors only: caption-dropout draws from the CPU data generator, and the
float64 DDPM tables, built on the CPU once per scheduler."""


@contextmanager
def read_backs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, str, bool]]]:
    """Records (method, file, function, tensor on CPU) of every read-back called from dittune's own code."""
    seen: list[tuple[str, str, str, bool]] = []
    with monkeypatch.context() as patch:
        for name in READ_BACKS:
            original = getattr(torch.Tensor, name)

            def wrapper(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
                code = sys._getframe(1).f_code
                if code.co_filename.startswith(PACKAGE):
                    seen.append((_name, Path(code.co_filename).name, code.co_name, self.device.type == "cpu"))
                return _original(self, *args, **kw)

            patch.setattr(torch.Tensor, name, wrapper)
        yield seen


def device_read_backs(seen: list[tuple[str, str, str, bool]]) -> list[tuple[str, str, str, bool]]:
    return [call for call in seen if not (call[3] and (call[1], call[2]) in CPU_BY_DESIGN)]


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_between_logs_do_not_read_back(
    family: str, family_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dittune.config import load_config
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    data = make_dataset(tmp_path / "data", sizes=((64, 64),))
    settings = {"mixed_precision": "no", "method": "full", "log_every_steps": 3, "gradient_accumulation_steps": 2}
    path = write_config(tmp_path / "cfg.toml", family_models[family], data, tmp_path / "run", family=family, **settings)
    cfg = load_config(path)
    run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _: None)
    trainer = Trainer(run, progress=False)

    outputs: list[Any] = []
    norms: list[torch.Tensor] = []
    compute_loss, clip = run.spec.compute_loss, run.accelerator.clip_grad_norm_

    def recording_loss(*args: Any, **kwargs: Any) -> Any:
        out = compute_loss(*args, **kwargs)
        outputs.append((out.loss.detach().clone(), dict(out.logs)))
        return out

    def recording_clip(parameters: Any, max_norm: float) -> Any:
        grads = [p.grad.detach().norm() for p in parameters if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(grads)))
        return clip(parameters, max_norm)

    monkeypatch.setattr(run.spec, "compute_loss", recording_loss)
    monkeypatch.setattr(run.accelerator, "clip_grad_norm_", recording_clip)

    for _ in range(2):  # steps 1 and 2 are not logging steps
        with read_backs(monkeypatch) as seen:
            loss, logs, _samples = trainer.optimizer_step()
            trainer.step += 1
        assert device_read_backs(seen) == [], f"{family}: a step that is not logged read tensors back"
        assert isinstance(loss, torch.Tensor) and all(isinstance(v, torch.Tensor | float) for v in logs.values())
        assert isinstance(trainer.nonfinite.first_bad, torch.Tensor)  # the default "stop" watch ran, on the device

    outputs.clear()
    norms.clear()
    loss, logs, samples = trainer.optimizer_step()  # step 3 is logged
    trainer.step += 1
    with read_backs(monkeypatch) as seen:
        logged_loss = trainer.log_step(loss, logs, samples, started=0.0)
    assert device_read_backs(seen) == [("tolist", "trainer.py", "read_numbers", True)]  # one read-back for all

    line = json.loads((cfg.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 3 and line["loss"] == logged_loss
    assert len(outputs) == 2 and len(norms) == 1
    expected_loss = sum(out_loss.item() for out_loss, _ in outputs) / 2
    assert line["loss"] == pytest.approx(expected_loss, rel=1e-6)
    for key in outputs[0][1]:
        expected = sum(float(terms[key]) for _, terms in outputs) / 2
        assert line[key] == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    assert line["grad_norm"] == pytest.approx(norms[0].item(), rel=1e-5)
    assert "loss_mse" in line and all(isinstance(line[key], float) for key in ("loss", "loss_mse", "grad_norm"))
