"""kill -9 anywhere: a real `dittune train` killed at 20 seeded random points resumes to the uninterrupted run.

One output_dir carries a chain of processes. Each trial starts `dittune train CFG --resume latest`, waits for a
moment of the phase it aims at (a line on the process's stdout, or a file appearing), waits a further seeded
random delay, then freezes the process (SIGSTOP), records what it was doing from its output so far and the
files present, and kills it (SIGKILL). Freezing first makes the record exact: nothing changes on disk between
the look and the kill, which is what a kill -9 at that instant leaves. The next trial resumes the same folder,
so a resume's own start-up and checkpoint loading are killed too. To meet the cache fill more than once, a
trial that aims at it first deletes a few seeded cache entries (as if the cache had never been filled). A trial
that missed a phase of a few milliseconds which no kill has met yet is repeated (at most 3 times per aim).

After the chain, one more `--resume latest` (in this process) runs to the end, and then:
- the final LoRA equals the uninterrupted run's, tensor for tensor (`torch.equal`), and so does every logged loss;
- every resume started from the newest complete `step_*` (never an interrupted `.tmp-step_*`), and none is left;
- the lock of each killed run was taken over, and the last run released it;
- every cache entry verifies (checksum) and holds the same bytes as the uninterrupted run's cache;
- no process printed a traceback or an error;
- the kills met the start-up, the cache fill (latents and caption embeddings), training steps, checkpoint
  writes and the export of the final weights.
"""

from __future__ import annotations

import codecs
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, read_metrics, write_config
from dittune.cache.store import CacheStore
from dittune.cli.main import main

STEPS = 12
KILLS = 20
PLAN = {"start-up": 9, "latents": 2, "captions": 2, "step": 2, "checkpoint": 3, "export": 2}
"""Kills aimed at each phase (20). Start-up kills are the cheap ones: every later kill costs a whole start-up."""
MAX_RETRIES = 3
"""Per aim: a trial that missed a phase no kill has met yet (its moment is a few milliseconds) is run again."""
CACHE_DELETES = {"latents": (3, 8), "captions": (3, 5)}
"""How many of the 8 latent and 5 text entries a trial aiming at the cache fill deletes first."""
SEED = 13
LORA = "[checkpoint]\nevery_steps = 1\nkeep_last = 3\n[lora]\ndropout = 0.1\n"
"""A checkpoint every step (so checkpoint writes are frequent), and LoRA dropout so the RNG state matters."""
DELAYS = {  # seconds after the aim's moment is seen: spread over the phase's usual length on this machine
    "start-up": (0.3, 6.5),
    "latents": (0.0, 0.04),
    "captions": (0.0, 0.03),
    "step": (0.0, 0.05),
    "checkpoint": (0.0, 0.025),
    "export at loss.png": (0.0, 0.01),
    "export at final/": (0.0, 0.008),
}
_ENCODING = re.compile(r"Encoding (latents|captions):[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/(\d+)")
_RESUMED = re.compile(r"Resumed\s+from (\S+) at step (\d+)")
_SUMMARY = re.compile(r"(?m)^Output\s+\S")


class Train:
    """A `dittune train --resume latest` subprocess; its stdout and stderr, merged, are collected on a thread."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        command = [sys.executable, "-m", "dittune", "train", str(config), "--resume", "latest"]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = ""
        self.ended = False
        self._summary = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in iter(lambda: self.process.stdout.read1(1 << 16), b""):
            with self._changed:
                self.output += decoder.decode(chunk)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, moment: Callable[[], bool], files: bool, timeout: float = 120) -> None:
        """Until `moment()` holds (or the output ends); checked on new output, and every millisecond once
        training started when `moment` looks at files."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not moment() and not self.ended and time.monotonic() < deadline:
                self._changed.wait(0.001 if files and self.summary_printed else 0.5)

    def finish(self, timeout: float = 180) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    @property
    def summary_printed(self) -> bool:
        self._summary = self._summary or bool(_SUMMARY.search(self.output))
        return self._summary


@dataclass
class Kill:
    aim: str
    phase: str
    detail: str
    seconds: float
    start: int
    """The step the killed process resumed from."""


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a path, or None: tells a file or folder written by this process from an older one."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _tmp_checkpoints(out: Path) -> dict[str, tuple[int, int] | None]:
    """Interrupted (or in-progress) checkpoint folders: name → stamp."""
    return {path.name: _stamp(path) for path in (out / "checkpoints").glob(".tmp-step_*")}


def _newest_checkpoint(out: Path) -> Path | None:
    complete = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file())
    return complete[-1] if complete else None


def _complete(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()


def _delete_cache_entries(cache: Path, kind: str, rng: random.Random, counts: tuple[int, int]) -> int:
    entries = sorted((cache / kind).glob("*/*.safetensors"))
    chosen = rng.sample(entries, min(len(entries), rng.randint(*counts)))
    for entry in chosen:
        entry.unlink()
    return len(chosen)


@dataclass
class Trial:
    """One process of the chain: what it aims at, and the files as they were when it started."""

    aim: str
    out: Path
    start: int
    target: int
    """The step whose computation (aim "step") or checkpoint (aim "checkpoint") the kill aims at."""
    stale: dict[str, tuple[int, int] | None]
    plot: tuple[int, int] | None
    final: tuple[int, int] | None
    weights: tuple[int, int] | None
    """Stamps of loss.png, final/ and final/lora.safetensors when the trial started."""
    export_at: str = "final/"
    """What an export trial waits for: "final/" (the export of the weights began) or "loss.png" (the run's end
    began: the loss plot is written, then the weights are checked for non-finite values, gathered, exported)."""

    def fresh_tmp(self) -> list[str]:
        """Checkpoint folders this process is writing (not left over from an earlier kill)."""
        return [name for name, stamp in _tmp_checkpoints(self.out).items() if self.stale.get(name) != stamp]

    def reached(self, train: Train) -> bool:
        """Whether the moment the trial waits for has come (the kill follows after a random delay)."""
        if self.aim == "start-up":
            return True
        if self.aim in ("latents", "captions"):
            return f"Encoding {self.aim}:" in train.output
        if self.aim == "checkpoint":
            return f".tmp-step_{self.target:08d}" in self.fresh_tmp()
        if self.aim == "step":  # the step before it is checkpointed: the target step is being computed
            return train.summary_printed and (self.target == self.start + 1 or _complete(self.out, self.target - 1))
        if self.export_at == "final/":  # the weights' export began: final/ made, or written into
            return train.summary_printed and _stamp(self.out / "final") != self.final
        return _stamp(self.out / "loss.png") not in (None, self.plot)  # the run's end began: the loss plot written

    def phase(self, train: Train) -> tuple[str, str]:
        """What the frozen process was doing: from its output so far and the files present."""
        if train.process.poll() is not None:
            return "finished", f"exit status {train.process.returncode}"
        fresh = self.fresh_tmp()
        if fresh:
            files = sorted(p.name for p in (self.out / "checkpoints" / fresh[0]).iterdir())
            return "checkpoint", f"{fresh[0]} being written, holding {files}"
        if not train.summary_printed:
            bars = _ENCODING.findall(train.output)
            if bars and int(bars[-1][1]) < int(bars[-1][2]):  # a bar prints when it opens and when it closes
                kind = bars[-1][0]
                folder = self.out / "cache" / ("latents" if kind == "latents" else "text")
                entries = len(list(folder.glob("*/*.safetensors")))
                writing = len(list(folder.glob("*/.*.tmp")))
                return "cache", f"{kind} being encoded: {entries} entries on disk, {writing} temporary files"
            lines = [line.strip() for line in re.split(r"[\r\n]", train.output) if line.strip()]
            return "start-up", f"after {lines[-1][:60]!r}" if lines else "before any output"
        if "Done:" in train.output:
            return "exiting", "after the last line"
        if _complete(self.out, STEPS):
            final = self.out / "final"
            if not final.is_dir():
                return "export", "final/ not made yet"
            names = sorted(p.name for p in final.iterdir())
            weights = "written" if _stamp(final / "lora.safetensors") != self.weights else "not yet written"
            if ".lora.safetensors.tmp" in names:
                weights = "being written"
            return "export", f"final weights {weights}; final/ holds {names}"
        newest = _newest_checkpoint(self.out)
        return "step", f"computing step {int(newest.name[5:]) + 1 if newest else 1}"


def _kill_at(train: Train, trial: Trial, rng: random.Random) -> Kill:
    """Wait for the aim's moment plus a random delay, freeze the process, record its phase, kill it."""
    delay = rng.uniform(*DELAYS[f"export at {trial.export_at}" if trial.aim == "export" else trial.aim])
    train.wait_for(lambda: trial.reached(train), files=trial.aim in ("step", "checkpoint", "export"))
    time.sleep(delay)
    train.process.send_signal(signal.SIGSTOP)
    time.sleep(0.05)  # let the reader take what the process wrote before it froze
    phase, detail = trial.phase(train)
    train.process.kill()
    train.finish()
    return Kill(trial.aim, phase, detail, time.monotonic() - train.started, trial.start)


def _check_output(output: str, out: Path, expected: Path | None) -> None:
    """No traceback or error; a resume that got as far as its summary started from `expected`, the newest
    complete checkpoint (never an interrupted `.tmp-step_*`)."""
    assert "Traceback" not in output and "error:" not in output, output[-3000:]
    if _SUMMARY.search(output):
        found = _RESUMED.search(output)
        resumed = found.group(1) if found else None
        assert ".tmp-step" not in str(resumed)
        assert resumed == (str(expected) if expected else None), (resumed, expected, output[-2000:])
        if expected is None:
            assert f"--resume latest: no checkpoint in {out}" in output


def _hit(kill: Kill) -> bool:
    """Whether the kill met the phase it aimed at."""
    if kill.aim in ("latents", "captions"):
        return kill.phase == "cache" and kill.detail.startswith(kill.aim)
    return kill.phase == kill.aim


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "lora.safetensors")


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*/*/*.safetensors"))}


def _train_settings() -> dict[str, object]:
    return {"max_steps": STEPS, "caption_dropout": 0.2, "log_every_steps": 1, "lr_scheduler": "cosine"}


@pytest.fixture(scope="module")
def uninterrupted(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kill-anywhere")
    data = make_dataset(root / "data")
    out = root / "straight"
    config = write_config(root / "straight.toml", tiny_models["v1.2"], data, out, LORA, **_train_settings())
    assert main(["train", str(config)]) == 0
    return data, out


def _report(kills: list[Kill]) -> str:
    return "\n".join(
        f"{k.aim:>10} → {k.phase:<10} at {k.seconds:4.1f} s (from step {k.start:2}): {k.detail}" for k in kills
    )


def _kill_chain(config: Path, out: Path, rng: random.Random) -> tuple[list[Kill], int]:
    """Run the chain of killed processes on `out`; returns the kills and how many resumes found an interrupted
    checkpoint (a `.tmp-step_*` folder) and got far enough to say where they resumed from."""
    aims = [aim for aim, count in PLAN.items() if aim != "export" for _ in range(count)]
    rng.shuffle(aims)
    aims += ["export"] * PLAN["export"]  # last: after the first of them the chain has no steps left
    kills: list[Kill] = []
    retries = dict.fromkeys(PLAN, 0)
    stale_tmp_resumes = 0
    while aims:
        aim = aims.pop(0)
        if aim in ("latents", "captions"):  # as if the cache had never been filled: the fill runs again
            _delete_cache_entries(out / "cache", "latents" if aim == "latents" else "text", rng, CACHE_DELETES[aim])
        expected = _newest_checkpoint(out)
        start = int(expected.name[5:]) if expected else 0
        target = min(start + 1 + rng.randint(0, 2), STEPS)  # a step or two past the resumed one
        stamps = [_stamp(out / name) for name in ("loss.png", "final", "final/lora.safetensors")]
        export_at = ("final/", "loss.png")[sum(k.aim == "export" for k in kills) % 2]
        trial = Trial(aim, out, start, target, _tmp_checkpoints(out), *stamps, export_at)
        train = Train(config)
        kills.append(_kill_at(train, trial, rng))
        try:
            _check_output(train.output, out, expected)
        except AssertionError as error:
            raise AssertionError(f"{error}\nkills so far:\n{_report(kills)}") from None
        stale_tmp_resumes += bool(trial.stale) and train.summary_printed
        missed = kills[-1].phase == "finished" or not any(_hit(k) for k in kills if k.aim == aim)
        if missed and retries[aim] < MAX_RETRIES:
            retries[aim] += 1  # the run ended first, or a short phase no kill met yet: aim at it once more
            aims.insert(0, aim)
    return kills, stale_tmp_resumes


def test_kill_9_anywhere_resumes_bit_identical(
    uninterrupted: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, straight = uninterrupted
    out = tmp_path / "killed"
    config = write_config(tmp_path / "killed.toml", tiny_models["v1.2"], data, out, LORA, **_train_settings())
    started = time.monotonic()
    kills, stale_tmp_resumes = _kill_chain(config, out, random.Random(SEED))
    report = _report(kills)
    chain_seconds = time.monotonic() - started

    expected, stale = _newest_checkpoint(out), _tmp_checkpoints(out)
    capsys.readouterr()
    assert main(["train", str(config), "--resume", "latest"]) == 0, report  # the chain's end, uninterrupted
    printed = capsys.readouterr()
    _check_output(printed.out + printed.err, out, expected)
    stale_tmp_resumes += bool(stale)
    print(f"{len(kills)} processes killed in {chain_seconds:.0f} s:\n{report}")

    assert sum(k.phase != "finished" for k in kills) >= KILLS, report
    assert {"start-up", "cache", "step", "checkpoint", "export"} <= {k.phase for k in kills}, report
    assert {k.detail.split()[0] for k in kills if k.phase == "cache"} == {"latents", "captions"}, report
    assert stale_tmp_resumes >= 1, report  # a resume found an interrupted checkpoint and passed it over
    assert not _tmp_checkpoints(out)  # each interrupted checkpoint was written again and renamed
    assert not (out / ".dittune.lock").exists()  # each killed run's lock was taken over, the last one released

    want, got = _lora(straight), _lora(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    losses = [(m["step"], m["loss"]) for m in read_metrics(out)]
    assert losses == [(m["step"], m["loss"]) for m in read_metrics(straight)]

    store = CacheStore(out / "cache")
    for kind in ("latents", "text"):
        entries = store.entries(kind)
        assert entries and all(store.contains(kind, entry.stem) for entry in entries)
    assert not store.damaged
    assert _cache_files(out / "cache") == _cache_files(straight / "cache")  # the same bytes, however encoded
