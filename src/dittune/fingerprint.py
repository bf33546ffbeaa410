"""Fingerprints of files and model component folders, for cache keys.

A file fingerprint is either its content hash (SHA-256) or its path + size + mtime ("stat").
A component fingerprint covers every config file's content and every weight file's content hash.
Content hashes of large files are memoised in a JSON file keyed by (path, size, mtime_ns), so a
10 GB text encoder is hashed once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Literal

FingerprintMode = Literal["content", "stat"]

_CHUNK = 1 << 20
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".yaml")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_hash(payload: object) -> str:
    """SHA-256 of a JSON-serialisable payload with sorted keys."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Fingerprinter:
    """Computes fingerprints, memoising content hashes of unchanged files in `memo_file`."""

    def __init__(self, memo_file: Path | None = None) -> None:
        self.memo_file = memo_file
        self._memo: dict[str, str] = {}
        self._dirty = False
        if memo_file is not None and memo_file.is_file():
            try:
                self._memo = json.loads(memo_file.read_text())
            except (OSError, ValueError):
                self._memo = {}

    def file(self, path: Path, mode: FingerprintMode = "content") -> str:
        path = Path(path).resolve()
        stat = path.stat()
        stat_id = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if mode == "stat":
            return "stat:" + hashlib.sha256(stat_id.encode()).hexdigest()
        cached = self._memo.get(stat_id)
        if cached is None:
            cached = sha256_file(path)
            self._memo[stat_id] = cached
            self._dirty = True
        return "sha256:" + cached

    def folder(self, folder: Path) -> str:
        """Fingerprint of a component folder: config contents and weight content hashes."""
        folder = Path(folder)
        parts: dict[str, str] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if path.suffix in _CONFIG_SUFFIXES or path.suffix in _WEIGHT_SUFFIXES:
                parts[rel] = self.file(path, "content")
        return canonical_hash(parts)

    def save(self) -> None:
        """Persist the memo (atomically) if it changed."""
        if self.memo_file is None or not self._dirty:
            return
        self.memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.memo_file.with_name(f".{self.memo_file.name}.{uuid.uuid4().hex}.tmp")  # several processes may save
        tmp.write_text(json.dumps(self._memo, indent=0, sort_keys=True))
        os.replace(tmp, self.memo_file)
        self._dirty = False
