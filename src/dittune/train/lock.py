"""One run per output_dir: the lock file OUTPUT_DIR/.dittune.lock, and what counts as another run's outputs.

The lock is created atomically (O_CREAT | O_EXCL) and holds JSON naming its owner: pid, host, start time and
command, plus what tells a live owner from a dead one on Linux (boot id, pid namespace, the process's start
tick), so a pid reused after a crash or a reboot is not mistaken for the owner. A lock whose owner is gone
(killed, crashed, machine rebooted) is reported and taken over; a lock held by a live process, or by a process on
another host (whose liveness cannot be checked from here), is refused with the owner and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from dittune.train.checkpoint import checkpoints_dir, complete_checkpoints

LOCK_FILE = ".dittune.lock"
_STEP_ENTRY = re.compile(r"^(\.tmp-)?step_\d+")
_UNREADABLE_GRACE_S = 2.0
"""A lock that cannot be parsed is being written for this long at most; after that it is stale."""


class OutputDirLocked(FileExistsError):
    """Another live dittune process holds the output_dir's lock."""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start tick since boot) of `pid` from /proc, or None where /proc has no such entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def owner_record(command: str | None = None) -> dict[str, Any]:
    """What this process writes into a lock it takes."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "pid_start": stat[1] if stat else None,
        "token": uuid.uuid4().hex,
    }


def owner_state(owner: dict[str, Any]) -> str:
    """ "alive", "gone" or "elsewhere" (another host or pid namespace: its liveness cannot be checked here)."""
    if owner.get("host") != socket.gethostname():
        return "elsewhere"
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return "gone"  # the machine rebooted since
    if owner.get("pid_namespace") and _pid_namespace() and owner["pid_namespace"] != _pid_namespace():
        return "elsewhere"  # another container on the same host name
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return "gone"
    if sys.platform == "win32":  # os.kill would end the process there
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # another user's process
        pass
    stat = _proc_stat(pid)
    if stat is not None and (stat[0] in ("Z", "X") or (owner.get("pid_start") and stat[1] != owner["pid_start"])):
        return "gone"  # a zombie, or the pid now belongs to another process
    return "alive"


def describe(owner: dict[str, Any]) -> str:
    """ "pid 123 on host h, since 2025-…(command)" for messages."""
    command = f" ({owner['command']})" if owner.get("command") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('started', '?')}{command}"


class RunLock:
    """`with RunLock(output_dir):` holds OUTPUT_DIR/.dittune.lock for the block (released on exceptions too).

    Raises `OutputDirLocked` when another live process holds it; a stale lock is taken over and reported in
    `notes`. The output folder is created if needed.
    """

    def __init__(self, output_dir: Path, command: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.record = owner_record(command)
        self.notes: list[str] = []
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (see the class); returns self."""
        self.output_dir.mkdir(parents=True, exist_ok=True)  # an OSError names the path (see cli.main)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            text = self._settled_text()
            if text is None:
                continue  # removed meanwhile: try again
            try:
                owner = json.loads(text)
                state = owner_state(owner) if isinstance(owner, dict) else "gone"
            except ValueError:
                owner, state = {}, "gone"
            if state != "gone":
                raise OutputDirLocked(self._refusal(owner, state))
            if _read(self.path) == text:  # nobody took it over meanwhile
                self.path.unlink(missing_ok=True)
                what = describe(owner) if isinstance(owner, dict) and owner else "unreadable content"
                self.notes.append(
                    f"note: took over the stale lock {self.path} ({what}): that process is gone "
                    "(killed or crashed); `--resume latest` continues a run from its last checkpoint."
                )
        raise OutputDirLocked(f"{self.path}: could not take the lock (other processes keep taking it); try again")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if self.held:
            self.held = False
            try:
                if json.loads(_read(self.path) or "{}").get("token") == self.record["token"]:
                    self.path.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass

    def _create(self) -> bool:
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(handle, json.dumps(self.record, indent=2).encode())
            os.fsync(handle)
        except OSError:  # e.g. a full disk: leave no empty lock behind
            os.close(handle)
            self.path.unlink(missing_ok=True)
            raise
        os.close(handle)
        return True

    def _settled_text(self) -> str | None:
        """The lock's text once it parses (or once the grace period for an owner still writing it is over)."""
        deadline = time.monotonic() + _UNREADABLE_GRACE_S
        while True:
            if not self.path.exists():
                return None
            text = _read(self.path)
            try:
                json.loads(text)
                return text
            except ValueError:
                if time.monotonic() > deadline:
                    return text
                time.sleep(0.05)

    def _refusal(self, owner: dict[str, Any], state: str) -> str:
        head = f"output_dir {self.output_dir} is in use by another dittune run: {describe(owner)}."
        if state == "alive":
            fix = f"Wait for it to end or stop it (kill {owner.get('pid')}), or choose another output_dir."
        else:
            fix = (
                "Its liveness cannot be checked from this host: wait for it to end, or choose another output_dir; "
                f"if it is not running any more (its machine is gone), delete {self.path} and start again."
            )
        return f"{head} {fix}"


# --- another run's outputs ---------------------------------------------------------------------------------------


def previous_run(output_dir: Path) -> list[str]:
    """What in `output_dir` shows that a run already trained there: checkpoints, final weights, metrics.

    A cache (after `dittune cache`), config.resolved.json or logs alone are not a run."""
    output_dir = Path(output_dir)
    found = []
    checkpoints = complete_checkpoints(output_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), the newest {checkpoints[-1][1].name}")
    final = output_dir / "final"
    if final.is_dir() and any(final.iterdir()):
        found.append("final weights (final/)")
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def run_outputs(output_dir: Path, cache_dir: Path | None = None) -> list[Path]:
    """What a run writes into `output_dir` and `--overwrite` removes: checkpoints, final/, validation images,
    metrics.jsonl, loss.png and tracker logs. Never the cache, nor anything dittune does not write."""
    output_dir = Path(output_dir)
    found: list[Path] = []
    for folder in (checkpoints_dir(output_dir), output_dir / "validation"):
        if folder.is_dir():
            found += sorted(child for child in folder.iterdir() if _STEP_ENTRY.match(child.name))
    for name in ("final", "logs", "metrics.jsonl", "loss.png"):
        if (output_dir / name).exists() or (output_dir / name).is_symlink():
            found.append(output_dir / name)
    if cache_dir is not None:
        cache = Path(cache_dir).resolve()
        found = [path for path in found if not cache.is_relative_to(path.resolve())]
    return found


def remove_run_outputs(output_dir: Path, cache_dir: Path | None = None) -> list[Path]:
    """Remove `run_outputs` (and the checkpoints/ and validation/ folders when that empties them); returns them."""
    output_dir = Path(output_dir)
    removed = run_outputs(output_dir, cache_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in (checkpoints_dir(output_dir), output_dir / "validation"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed
