"""FSDP2 on a CPU (torch's `fully_shard` with gloo, 2 processes), through dittune's own pieces: the denoiser is
sharded by the spec's transformer blocks (`shard_denoiser`), a LoRA (fp32 adapter on the same blocks as the
frozen base) and a full fine-tune train two steps on halves of each global batch — with per-sample draws,
global-norm clipping and AdamW — and end where one process training on the whole batch ends; the gathered
adapter (`gather_state`, as the checkpoint hook and the export use it) loads back into a fresh sharded model
(`load_full_state`); a checkpoint of the sharded full fine-tune (weights and the optimizer's state, gathered into
safetensors + JSON) restores into a fresh sharded model and optimizer so that the next step is identical; and the
stock pipeline samples with the sharded denoiser on both processes, equal to the
unsharded one.

accelerate only enables FSDP on GPUs (on a CPU it falls back to DDP), so the trainer's accelerate-FSDP2 path
itself is checked by benchmarks/multi_gpu.py on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = r"""
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from dittune.models.base import SampleMeta, TrainBatch
from dittune.models.draws import SampleDraws
from dittune.models.lora import inject_lora, is_lora_key, lora_module_state, lora_state_dict
from dittune.models.registry import spec_class
from dittune.train.sharding import gather_state, is_sharded, load_full_state, shard_denoiser

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
family, folder, scratch = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
spec = spec_class(family)(folder)
prompts = ["a red circle", "a blue square", "a green disc", ""]
text = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), prompts)
pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
with torch.no_grad():
    moments = spec.encode_pixels(spec.load_vae(torch.device("cpu"), torch.float32), pixels)
meta = [SampleMeta((64, 64), (64, 64), (0, 0))] * 4


def batch(rows):
    return TrainBatch(
        moments={k: torch.stack([moments[i][k] for i in rows]) for k in moments[0]},
        text={k: torch.stack([text[i][k] for i in rows]) for k in text[0]},
        meta=[meta[i] for i in rows],
    )


def model(method, seed):
    torch.manual_seed(seed)
    denoiser = spec.load_denoiser(torch.float32)
    if method == "lora":
        denoiser.requires_grad_(False)
        inject_lora(denoiser, rank=4, alpha=4.0, targets=list(spec.default_lora_targets))
        for name, param in denoiser.named_parameters():
            if ".lora_" in name:
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.05)
                param.requires_grad_(True)
    return denoiser.train()


def train(denoiser, rows, steps=range(2), optimizer=None):
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-3)
    settings = spec.default_loss_settings("lora")
    scheduler = spec.load_scheduler()
    for step in steps:
        out = spec.compute_loss(denoiser, scheduler, batch(rows), SampleDraws(5, step, rows, "cpu"), settings)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)  # small: the global norm must be the whole model's
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


report = {}
for method in ("lora", "full"):
    keep = is_lora_key if method == "lora" else None
    reference = model(method, 0)
    train(reference, [0, 1, 2, 3])
    sharded = shard_denoiser(spec, model(method, 0))
    assert is_sharded(sharded)
    optimizer = train(sharded, [2 * rank, 2 * rank + 1])  # FSDP2 averages the gradients of the two halves
    state = gather_state(sharded, keep=keep)
    if method == "full":  # a checkpoint of sharded weights and optimizer, restored into a fresh sharded model
        from accelerate import Accelerator
        from dittune.train.checkpoint import Checkpointed, read_training_state, write_training_state
        from dittune.train.methods import FullMethod

        accelerator = Accelerator(cpu=True)
        folder = scratch / "checkpoint"
        folder.mkdir(exist_ok=True)

        def parts(net, optim):
            return Checkpointed(accelerator, net, optim, {}, lambda f: FullMethod().save_weights(accelerator, net, f),
                                lambda f: FullMethod().load_weights(accelerator, net, f))

        write_training_state(parts(sharded, optimizer), folder)
        dist.barrier()
        resumed = shard_denoiser(spec, model(method, 1))
        fresh_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
        read_training_state(parts(resumed, fresh_optimizer), folder)
        for net, optim in ((sharded, optimizer), (resumed, fresh_optimizer)):
            train(net, [2 * rank, 2 * rank + 1], steps=[2], optimizer=optim)  # Adam's moments and step count
        after, again = gather_state(sharded), gather_state(resumed)
        if rank == 0:
            report["resumed"] = max((after[k] - again[k]).abs().max().item() for k in after)
            report["files"] = sorted(p.name for p in folder.iterdir())
    if rank == 0:
        expected = {k: v for k, v in reference.state_dict().items() if keep is None or keep(k)}
        report[method] = {
            "keys": sorted(state) == sorted(expected),
            "moved": max((v - model(method, 0).state_dict()[k]).abs().max().item() for k, v in expected.items()),
            "difference": max((state[k] - expected[k]).abs().max().item() for k in expected),
        }
    if method == "lora":  # the adapter file round trip of checkpoints: gathered on 0, loaded by every process
        if rank == 0:
            from safetensors.torch import save_file
            save_file(lora_state_dict(sharded, state=state), str(scratch / "adapter.safetensors"))
        dist.barrier()
        from safetensors.torch import load_file
        adapter = load_file(str(scratch / "adapter.safetensors"))
        fresh = shard_denoiser(spec, model(method, 1))
        load_full_state(fresh, lora_module_state(fresh, adapter))
        again = gather_state(fresh, keep=keep)
        if rank == 0:
            report["reloaded"] = max((again[k] - state[k]).abs().max().item() for k in state)
        vae = spec.load_vae(torch.device("cpu"), torch.float32)
        images = []
        for denoiser in (fresh, reference):
            denoiser.eval()
            pipeline = spec.build_pipeline(denoiser, vae, spec.load_scheduler())
            kwargs = spec.pipeline_kwargs(text[0], text[3], width=64, height=64, steps=2, guidance=4.0,
                                          generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                images.append(pipeline(**kwargs, output_type="pt").images)
        if rank == 0:
            report["pipeline"] = (images[0] - images[1]).abs().max().item()
if rank == 0:
    print("REPORT " + json.dumps(report))
dist.destroy_process_group()
"""


def test_fsdp2_on_cpu_trains_like_one_process(family_models, tmp_path: Path) -> None:
    script = tmp_path / "fsdp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(
        [*command, "sd3", str(family_models["sd3"]), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line[7:])
    for method in ("lora", "full"):
        assert report[method]["keys"], method
        assert report[method]["moved"] > 1e-4, method  # the two steps changed the weights
        assert report[method]["difference"] < 1e-5, (method, report)
    assert report["reloaded"] == 0.0
    assert report["resumed"] == 0.0  # weights and optimizer state restored exactly into new shards
    assert all(name.endswith((".json", ".safetensors")) for name in report["files"]), report["files"]
    assert report["pipeline"] < 1e-5, report


def test_options_a_sharded_engine_cannot_run_are_refused_before_loading(
    family_models, tmp_path: Path, monkeypatch, capsys
) -> None:
    from conftest import make_dataset, write_config
    from dittune.cli.main import main

    data = make_dataset(tmp_path / "data")
    extra = "blocks_to_swap = 1\noptimizer_offload = true\n"
    cfg = write_config(tmp_path / "cfg.toml", family_models["sd3"], data, tmp_path / "run", extra, family="sd3")
    cfg.write_text(cfg.read_text().replace("[model]\n", '[model]\nbase_storage = "fp8_e4m3"\n'))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    for key in ("train.blocks_to_swap", "model.base_storage", "train.optimizer_offload: use fsdp's own offload"):
        assert key in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


def test_deepspeed_gets_the_micro_batch_and_clipping_accelerate_leaves_auto() -> None:
    """Without a prepared dataloader accelerate cannot fill DeepSpeed's "auto" batch size (it raises at `prepare`);
    dittune fills it and the clipping norm from the config, and keeps values a DeepSpeed config sets itself."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DeepSpeedPlugin

    from dittune.train.sharding import as_number_tensor, configure_deepspeed

    plugin = DeepSpeedPlugin(zero_stage=3)
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), 3, 0.5)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2  # set by the user's DeepSpeed config: kept
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), 3, None)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), 3, 0.5)  # not DeepSpeed
    assert torch.isnan(torch.tensor(as_number_tensor(None)))  # DeepSpeed reports no norm: logged as NaN
