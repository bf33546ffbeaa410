"""Several processes on one CPU (torchrun, gloo): the run is really distributed, the cache work is split so each
entry is encoded once, each process trains on its own share of every global batch, and a 2-process run with
gradient accumulation (accelerate's `accumulate`) resumes bit-identically (a different global batch is refused,
naming the fix). That every split of a global batch trains the same weights: tests/test_split_equality.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, write_config
from dittune.data.sampler import BucketBatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_processes_split_every_global_batch() -> None:
    buckets = {(64, 64, 1): list(range(7)), (96, 64, 1): [7, 8, 9, 10]}
    whole = BucketBatchSampler(buckets, batch_size=4, seed=3, random_flip=True)
    ranks = [BucketBatchSampler(buckets, batch_size=2, seed=3, random_flip=True, rank=r, world=2) for r in (0, 1)]
    assert [s.batches_per_epoch for s in ranks] == [whole.batches_per_epoch] * 2 == [3, 3]
    for epoch in (0, 1):
        together = [a.items + b.items for (a,), (b,) in zip(*(s.epoch_batches(epoch) for s in ranks))]
        full = whole.global_batches(epoch)
        for joined, batch in zip(together, full):
            if len(batch) == 4:
                assert joined == batch  # the same samples, flips and order as one process with the global batch
            else:  # the last 3 of the 7: split 2 + 2, topped up with its own first sample
                assert joined == [*batch, batch[0]]
    whole.load_state_dict(ranks[0].state_dict())  # the same global batch
    with pytest.raises(ValueError, match="global_batch 4 → 2"):
        BucketBatchSampler(buckets, batch_size=2, seed=3, random_flip=True).load_state_dict(ranks[0].state_dict())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, family_models: dict[str, Path]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multiprocess")
    data = make_dataset(root / "data")
    return root, data


def test_the_cache_is_encoded_once_across_processes(setup, family_models, tmp_path: Path) -> None:
    _, data = setup
    cfg = write_config(tmp_path / "cfg.toml", family_models["sd3"], data, tmp_path / "run", family="sd3")
    script = tmp_path / "count.py"
    script.write_text(
        "import json, sys\n"
        "from dittune.config import load_config\n"
        "from dittune.train.prepare import fill_caches\n"
        "from dittune.train.setup import cache_shard, load_spec\n"
        "import torch\n"
        "cfg = load_config(sys.argv[1])\n"
        "spec, _ = load_spec(cfg)\n"
        "calls = {'pixels': 0, 'prompts': 0}\n"
        "encode_pixels, encode_prompts = spec.encode_pixels, spec.encode_prompts\n"
        "def pixels(vae, p):\n"
        "    calls['pixels'] += p.shape[0]\n"
        "    return encode_pixels(vae, p)\n"
        "def prompts(encoders, texts):\n"
        "    calls['prompts'] += len(texts)\n"
        "    return encode_prompts(encoders, texts)\n"
        "spec.encode_pixels, spec.encode_prompts = pixels, prompts\n"
        "shard = cache_shard()\n"
        "prepared, _ = fill_caches(cfg, spec, device=torch.device('cpu'), compute_dtype='fp32', keep_vae=False,\n"
        "                          progress=False, announce=lambda _: None, shard=shard)\n"
        "line = {'rank': shard.rank, **calls, 'keys': sorted(prepared.latent_keys.values()),\n"
        "        'encoded': prepared.stats['latents'].misses}\n"
        "print('COUNT', json.dumps(line))\n"
    )
    result = _torchrun([str(script), str(cfg)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("COUNT ")]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    assert sum(line["pixels"] for line in lines) == 8 and all(line["pixels"] == 4 for line in lines)
    assert sum(line["prompts"] for line in lines) == 5  # 4 captions + the empty prompt, each once
    assert lines[0]["keys"] == lines[1]["keys"] and len(lines[0]["keys"]) == 8  # both see every entry
    assert all(line["encoded"] == 8 for line in lines)  # each process counts all entries written


FAULTS = """
import sys, time
import dittune.train.trainer as trainer
from dittune.cli.main import main

if sys.argv[2] == "validation":
    def failing(*args, **kwargs):
        time.sleep(2)  # the other process waits meanwhile
        raise RuntimeError("injected validation failure")
    trainer.run_validation = failing
else:
    original = trainer.Trainer.optimizer_step
    def step(self):
        if self.step == 1 and self.run.accelerator.process_index == 1:
            raise RuntimeError("injected crash on process 1")
        return original(self)
    trainer.Trainer.optimizer_step = step
sys.exit(main(["train", sys.argv[1]]))
"""


def test_two_processes_train_and_resume_bit_identically(setup, family_models, tmp_path: Path, capsys) -> None:
    _, data = setup
    straight = tmp_path / "straight"
    extra = '[checkpoint]\nevery_steps = 3\nkeep_last = 5\n[validation]\nprompts = ["a red circle"]\nsteps = 1\n'
    settings = dict(
        max_steps=6, batch_size=1, gradient_accumulation_steps=2, caption_dropout=0.3, lr_scheduler="cosine"
    )
    cfg = write_config(tmp_path / "cfg.toml", family_models["sd3"], data, straight, extra, family="sd3", **settings)
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    result = _torchrun([str(script), str(cfg), "validation"], cwd=tmp_path)  # validation fails on process 0
    assert result.returncode == 0, result.stderr[-3000:]  # training went on; the other process waited each time
    assert "accumulation 2 × 2 process(es) = 4 samples per step" in result.stdout
    warning = "warning: step {}: validation failed: RuntimeError: injected validation failure"
    assert warning.format(0) in result.stdout and warning.format(6) in result.stdout  # at the start and the end
    checkpoint = straight / "checkpoints" / "step_00000003"

    crashed = tmp_path / "crashed"
    shutil.copytree(checkpoint, crashed / "checkpoints" / "step_00000003")
    args = [
        "-m",
        "dittune",
        "train",
        str(cfg),
        "--set",
        f"output_dir={crashed}",
        "--set",
        f"cache.dir={straight}/cache",
    ]
    result = _torchrun([*args, "--resume", "latest"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(straight / "final" / "lora.safetensors"), load_file(crashed / "final" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from dittune.cli.main import main

    single = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight}/cache"]
    assert main([*single, "--resume", str(checkpoint)]) != 0  # half the global batch: another run
    assert "took 4 samples per step (batch 1 × 2 process(es) × accumulation 2)" in capsys.readouterr().err


def test_a_crashed_process_ends_the_run_on_every_process(setup, family_models, tmp_path) -> None:
    _, data = setup
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    cfg = write_config(tmp_path / "cfg.toml", family_models["sd3"], data, tmp_path / "run", family="sd3", max_steps=3)
    result = _torchrun([str(script), str(cfg), "crash"], cwd=tmp_path)  # bounded by _torchrun's timeout
    assert result.returncode != 0
    assert "injected crash on process 1" in result.stderr
    assert not (tmp_path / "run" / "final").exists()
