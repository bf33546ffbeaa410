"""A content-addressed store of tensor dicts in safetensors files.

An entry's key is a hash of everything that produced it, so a changed input simply misses and a
stale entry can never be returned. Writes are atomic (temporary file, then rename), and every file
records its own key, so a damaged or misplaced file is detected and treated as a miss.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

KEY_FIELD = "dittune_cache_key"
FIELDS_FIELD = "dittune_cache_fields"


class CacheStore:
    """Entries live at `root/<kind>/<key[:2]>/<key>.safetensors`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def contains(self, kind: str, key: str) -> bool:
        """True when a readable entry recording `key` exists; a damaged or misplaced file is removed.

        Only the header is read (cheap). safetensors has no checksums, so damage inside tensor data is
        caught later by `load`, which also treats it as a miss.
        """
        path = self.path(kind, key)
        if not path.is_file():
            return False
        try:
            with safe_open(path, framework="pt") as handle:
                if (handle.metadata() or {}).get(KEY_FIELD) == key:
                    return True
        except Exception:  # an unreadable header is a miss
            pass
        log.warning("cache entry %s is damaged or misplaced; it will be rebuilt", path)
        path.unlink(missing_ok=True)
        return False

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is missing or damaged (a damaged file is removed)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                if (handle.metadata() or {}).get(KEY_FIELD) != key:
                    raise ValueError("key recorded in the file does not match its name")
                return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as error:  # any unreadable file is a miss, never a crash
            log.warning("cache entry %s is damaged (%s); it will be rebuilt", path, error)
            path.unlink(missing_ok=True)
            return None

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], fields: dict) -> Path:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        metadata = {KEY_FIELD: key, FIELDS_FIELD: json.dumps(fields, sort_keys=True, default=str)}
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def fields(self, kind: str, key: str) -> dict | None:
        """The key fields an entry was stored with (for debugging and `dittune cache` reports)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                return json.loads((handle.metadata() or {}).get(FIELDS_FIELD, "{}"))
        except Exception:
            return None

    def entries(self, kind: str) -> list[Path]:
        return sorted((self.root / kind).glob("*/*.safetensors"))
