"""The training loop: steps count optimizer steps; checkpoints, metrics and validation hang off it."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dittune.cache.build import TEXT
from dittune.errors import RunStopped, os_errors_named
from dittune.export.model_card import derive_trigger_words, write_model_card
from dittune.media import load_image
from dittune.models.base import TextEmbedding
from dittune.models.draws import SampleDraws
from dittune.train.batches import CachedBatches, dropout_by_encoder
from dittune.train.checkpoint import save_checkpoint
from dittune.train.metrics import MetricsLog, PhaseMemory
from dittune.train.nonfinite import NonFiniteWatch
from dittune.train.optim import averaged_weights, set_optimizer_mode
from dittune.train.plot import plot_loss
from dittune.train.prepare import validation_fps, validation_frames, validation_size
from dittune.train.setup import Run, launch_engine
from dittune.train.sharding import as_number_tensor, gather_state, is_sharded
from dittune.train.signals import StopOnSignal
from dittune.train.waiting import SideWorkWait
from dittune.validate.runner import ValidationRequest, ValidationResult, run_validation

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    final: Path
    steps: int
    validation_errors: list[str] = field(default_factory=list)


class Trainer:
    def __init__(self, run: Run, start_step: int = 0, progress: bool = True) -> None:
        self.run = run
        self.step = start_step
        self.progress = progress
        cfg = run.cfg
        dropout = dropout_by_encoder(
            cfg.train.caption_dropout, cfg.train.caption_dropout_per_encoder, run.spec.text_encoders
        )
        self.batches = CachedBatches(run.store, run.prepared, run.spec.text_encoders, dropout, run.accelerator.device)
        self.metrics = MetricsLog(cfg.output_dir, run.accelerator, start_step)
        self.memory = run.memory or PhaseMemory(run.accelerator.device)
        self.memory.begin()  # the first window of steps starts after loading
        self.validation_errors: list[str] = []
        self._pipeline: Any = None
        self._validation_text: tuple[list[TextEmbedding], TextEmbedding] | None = None
        self.last_grid: Path | None = None
        processes = run.accelerator.num_processes if cfg.validation.prompts else 1
        self.wait_for_validation = SideWorkWait(processes, cfg.validation.timeout_minutes)
        self.nonfinite = NonFiniteWatch(
            cfg.train.on_nonfinite,
            cfg.train.max_nonfinite_skips,
            run.accelerator,
            cfg.output_dir,
            cfg.train.learning_rate,
        )

    # --------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        run, cfg = self.run, self.run.cfg
        set_optimizer_mode(run.optimizer, training=True)  # schedule-free: steps need the training weights
        if cfg.validation.prompts and cfg.validation.at_start and self.step == 0:
            self.validate()
        bar = tqdm(
            total=cfg.train.max_steps, initial=self.step, desc="Training", unit="step", disable=not self.progress
        )
        try:
            with StopOnSignal() as stop:
                while self.step < cfg.train.max_steps:
                    started = time.perf_counter()
                    loss, logs, samples = self.optimizer_step()
                    self.step += 1
                    bar.update(1)
                    logged = self.step % cfg.train.log_every_steps == 0 or self.step == cfg.train.max_steps
                    saved = self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps
                    if logged:
                        bar.set_postfix(loss=f"{self.log_step(loss, logs, samples, started):.4f}")
                    if saved:
                        self.checkpoint()
                    signalled = stop.requested(run.accelerator)
                    if signalled:
                        self.stop_on_signal(signalled, logged=logged, saved=saved, loss=(loss, logs, samples, started))
                    every = cfg.validation.every_steps
                    if cfg.validation.prompts and every and self.step % every == 0 and self.step < cfg.train.max_steps:
                        self.validate()
        finally:
            bar.close()  # also when a signal or a non-finite loss ends the loop
        if cfg.validation.prompts:
            self.validate()
        self.plot_loss()
        final = self.export()
        for tracker in run.accelerator.trackers:  # not `end_training`: it ends the process group too, and a
            tracker.finish()  # script may train again in it (the console script closes it on exit)
        return TrainResult(final=final, steps=self.step, validation_errors=self.validation_errors)

    def stop_on_signal(self, number: int, *, logged: bool, saved: bool, loss: tuple) -> None:
        """After the step a signal interrupted: log it, write its checkpoint (unless just written), say how to go
        on, and end the run with 128 + the signal number."""
        if not logged:
            self.log_step(*loss)
        path = self.checkpoint() if not saved else self.run.cfg.output_dir / "checkpoints" / f"step_{self.step:08d}"
        name = StopOnSignal.name(number)
        raise RunStopped(
            f"{name} after step {self.step}; the checkpoint is in {path}. "
            "Resume with the same command and --resume latest.",
            exit_status=128 + number,
        )

    def optimizer_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], int]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        The loss, the objective's logged terms and the grad norm stay tensors on the device (nothing is read
        back here); `log_step` turns them into numbers.
        """
        run, cfg = self.run, self.run.cfg
        accumulation = cfg.train.gradient_accumulation_steps
        device, seed = run.accelerator.device, cfg.train.seed
        total = torch.zeros((), device=device)
        logs: dict[str, torch.Tensor | float] = {}
        samples = 0
        _, micro_batches = run.sampler.next_step()
        for micro in micro_batches:
            # Every random number of a sample is keyed by (seed, step, its position in the global batch), so the
            # split into processes and micro-batches changes none of them.
            batch = self.batches.collate(micro.items, SampleDraws(seed, self.step, micro.positions, "cpu", "caption"))
            draws = SampleDraws(seed, self.step, micro.positions, device)
            samples += batch.size
            # accelerate's accumulation: gradients sync (DDP) or the engine steps (DeepSpeed) on the last
            # micro-batch only, and `backward` divides the loss by the number of micro-batches.
            with run.accelerator.accumulate(run.denoiser):
                with run.accelerator.autocast():
                    out = run.method.loss(run, batch, draws)
                run.accelerator.backward(out.loss)
            total += out.loss.detach() / accumulation
            for key, value in out.logs.items():
                logs[key] = logs.get(key, 0.0) + value / accumulation
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
        logs["grad_norm"] = as_number_tensor(run.accelerator.clip_grad_norm_(run.trainable, max_norm))
        finite = self.nonfinite.observe(self.step + 1, total, logs["grad_norm"])  # on the device, no read-back
        if not self.nonfinite.skip(self.step + 1, finite):  # "skip" mode reads `finite` back
            run.optimizer.step()
            run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return total, logs, samples

    def log_step(
        self, loss: torch.Tensor, logs: dict[str, torch.Tensor | float], samples: int, started: float
    ) -> float:
        """Write the metrics of the step just taken; returns its loss.

        Tensors become numbers only here (in one read-back, with the non-finite check's), so steps that are not
        logged never wait for the device. Raises `RunStopped` after the line if a step since the last check was
        not finite (`train.on_nonfinite = "stop"`).
        """
        checks = self.nonfinite.pending()
        loss_value, *numbers = read_numbers([loss, *logs.values(), *checks])
        values = dict(zip(logs, numbers[: len(logs)]))
        elapsed = time.perf_counter() - started
        self.metrics.log(self.step, {**self._metrics(loss_value, values, samples, elapsed), **self.nonfinite.metrics()})
        self.nonfinite.verdict(self.step, numbers[len(logs) :])
        return loss_value

    def _metrics(self, loss: float, logs: dict[str, float], samples: int, elapsed: float) -> dict[str, Any]:
        run = self.run
        world = run.accelerator.num_processes
        return {
            "loss": loss,
            **logs,
            "lr": run.lr_scheduler.get_last_lr()[0],
            "step_time": elapsed,
            "samples_per_s": samples * world / elapsed if elapsed > 0 else 0.0,
            **self._memory_metrics(),
            "epoch": run.sampler.state_dict()["epoch"],
        }

    def _memory_metrics(self) -> dict[str, float]:
        """The run's peak so far and each phase's since the last logged line (`PhaseMemory`); a window of
        steps starts."""
        self.memory.end("step")
        values = {"peak_memory_mb": self.memory.overall, **self.memory.take()}
        self.memory.begin()
        return values

    # -------------------------------------------------------------- side tasks
    def checkpoint(self) -> Path:
        run = self.run
        state = {
            "step": self.step,
            "processes": run.accelerator.num_processes,
            "engine": launch_engine(),
            "config": json.loads(run.cfg.model_dump_json()),
            "data_fingerprint": run.prepared.data_fingerprint,  # resume refuses changed data (resume_changes)
        }
        keep = run.cfg.checkpoint.keep_last
        with averaged_weights(run.optimizer):  # schedule-free: save (and resume from) the averaged weights
            self.nonfinite.check(self.step, run.trainable)  # never a checkpoint of non-finite weights
            return save_checkpoint(run.checkpointed(), run.cfg.output_dir, self.step, state, keep)

    def validate(self) -> ValidationResult | None:
        """The main process samples; the others wait for it (`SideWorkWait`). An error is recorded and printed,
        never raised, so a failed validation neither ends the run nor leaves the other processes waiting."""
        self.memory.end("step")  # the steps before it, kept for the next logged line
        self.memory.begin()
        result = None
        main = self.run.accelerator.is_main_process
        with averaged_weights(self.run.optimizer):  # schedule-free; on every process, so weights stay equal
            if main or is_sharded(self.run.denoiser):  # a sharded model's forward needs every process
                try:
                    result = self._validate(write=main)
                except Exception as error:  # any failure of sampling is reported; training goes on
                    message = f"step {self.step}: validation failed: {type(error).__name__}: {error}"
                    self.validation_errors.append(message)
                    print(f"warning: {message}")
        self.wait_for_validation()
        self.memory.end("validation")
        self.memory.begin()
        return result

    def _validate(self, write: bool = True) -> ValidationResult | None:
        """Sample the validation prompts; only with `write` are the files kept (the main process)."""
        run, cfg = self.run, self.run.cfg
        if run.vae is None:
            return None
        device = run.accelerator.device
        denoiser = run.accelerator.unwrap_model(run.denoiser)
        if self._pipeline is None:
            conditioned = bool(cfg.validation.images)
            self._pipeline = run.method.validation_pipeline(run.spec, denoiser, run.vae, conditioned)
        if self._validation_text is None:
            keys = run.prepared.text_keys
            self._validation_text = (
                [self.batches.load(TEXT, keys[p]) for p in cfg.validation.prompts],
                self.batches.load(TEXT, keys[cfg.validation.negative_prompt]),
            )
        positive, negative = self._validation_text
        width, height = validation_size(cfg, run.spec.alignment, run.spec.fixed_size)
        request = ValidationRequest(
            prompts=cfg.validation.prompts,
            positive=positive,
            negative=negative,
            width=width,
            height=height,
            steps=cfg.validation.steps,
            guidance=cfg.validation.guidance,
            seed=cfg.validation.seed,
            frames=validation_frames(cfg, run.spec),
            fps=validation_fps(cfg, run.spec, run.prepared.plan),
            images=[load_image(path) for path in cfg.validation.images] or None,
            extra=[run.method.validation_kwargs(cfg, index) for index in range(len(cfg.validation.prompts))],
        )
        parked = [run.vae, *run.spec.offloaded_parts(self._pipeline)]  # frozen parts wait on the CPU
        for part in parked:
            part.to(device)
        denoiser.eval()
        scratch = None if write else tempfile.TemporaryDirectory(prefix="dittune-validation-")
        try:
            out_dir = Path(scratch.name) if scratch else cfg.output_dir / "validation" / f"step_{self.step:08d}"
            result = run_validation(run.spec, self._pipeline, request, out_dir, run.accelerator.autocast)
        finally:
            denoiser.train()
            for part in parked:
                part.to("cpu")
            if scratch:
                scratch.cleanup()
        if not write:
            return None
        self.validation_errors += [f"step {self.step}: {e}" for e in result.errors]
        if result.grid is not None:
            self.last_grid = result.grid
            self._log_grid(result.grid)
        return result

    def plot_loss(self) -> Path | None:
        """OUTPUT_DIR/loss.png from metrics.jsonl (main process; a failure is reported, never raised)."""
        if not self.run.accelerator.is_main_process or not self.metrics.path.is_file():
            return None
        try:
            return plot_loss(self.metrics.path, self.run.cfg.output_dir / "loss.png")
        except (OSError, ValueError) as error:
            print(f"warning: could not draw the loss plot: {error}")
            return None

    def _log_grid(self, grid: Path) -> None:
        import numpy as np
        from PIL import Image

        for tracker in self.run.accelerator.trackers:
            if tracker.name == "tensorboard":
                image = np.asarray(Image.open(grid).convert("RGB"))
                tracker.writer.add_image("validation", image, self.step, dataformats="HWC")

    def export(self) -> Path:
        run, cfg = self.run, self.run.cfg
        final = cfg.output_dir / "final"
        set_optimizer_mode(run.optimizer, training=False)  # schedule-free: export the averaged weights
        self.nonfinite.check(self.step, run.trainable)  # never final weights that are not finite
        run.accelerator.wait_for_everyone()
        sharded = is_sharded(run.denoiser)
        state = None
        if sharded or run.method.gathered_keys is not None:  # on every process: gathering shards is a collective
            state = gather_state(run.denoiser, run.accelerator, run.method.gathered_keys)
        if not run.accelerator.is_main_process:
            return final
        model = run.accelerator.unwrap_model(run.denoiser)
        with os_errors_named(final):  # a full disk: the path and the fix, not safetensors' bare error
            run.method.export(run, model, state, final, self.step)
        self.write_model_card(final)
        return final

    def write_model_card(self, final: Path) -> None:
        """final/README.md: a Hugging Face model card (trigger words derived from the captions, the settings, the
        last validation grid). A failure is reported, never raised: the weights are saved."""
        run, cfg = self.run, self.run.cfg
        spec, samples = run.spec, run.prepared.plan.samples
        video = spec.frame_rule_at(spec.path).is_video
        task = "image-to-video" if spec.needs_image else "text-to-video" if video else "text-to-image"
        try:
            write_model_card(
                final,
                base_model=spec.path,
                family=spec.family,
                family_name=spec.display_name,
                method=cfg.train.method,
                config=cfg,
                steps=self.step,
                trigger_words=derive_trigger_words([sample.record.caption for sample in samples]),
                validation_prompts=cfg.validation.prompts,
                grid=self.last_grid,
                task=task,
                processes=run.accelerator.num_processes,
                precision=run.precision.name,
                lora_targets=list(cfg.lora.targets or spec.default_lora_targets),
                samples=len(samples),
                version=run.info.version,
                controlnet_classes=(spec.controlnet_class, spec.controlnet_pipeline_class)
                if cfg.train.method == "controlnet"
                else None,
            )
        except (OSError, ValueError) as error:
            print(f"warning: could not write the model card {final / 'README.md'}: {error}")


def read_numbers(values: list[torch.Tensor | float]) -> list[float]:
    """Python floats of scalar tensors and numbers, with one device read-back for all the tensors."""
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if not tensors:
        return [float(value) for value in values]
    device = tensors[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    read = iter(torch.stack([t.detach().reshape(()).to(device, dtype) for t in tensors]).tolist())
    return [next(read) if isinstance(value, torch.Tensor) else float(value) for value in values]
