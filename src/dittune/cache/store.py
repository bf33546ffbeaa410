"""A content-addressed store of tensor dicts in safetensors files.

An entry's key is a hash of everything that produced it, so a changed input simply misses and a
stale entry can never be returned. Writes are atomic (temporary file, then rename), and every file
records its own key, so a damaged or misplaced file is detected and treated as a miss.

Reads parse the safetensors header directly (8-byte length, JSON): `contains` reads only the header,
`load` reads the file in one call and builds the tensors from the bytes. Both check the recorded key and
that the file is exactly as long as its header says, which is what catches truncation.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

log = logging.getLogger(__name__)

KEY_FIELD = "dittune_cache_key"
FIELDS_FIELD = "dittune_cache_fields"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class DamagedEntry(ValueError):
    """A cache file that is not a complete safetensors file recording the expected key."""


def _check_header(raw: bytes, size: int, key: str | None) -> dict[str, Any]:
    """The parsed header (`raw` = the file's first bytes, at least the header) of a complete file of `size` bytes."""
    if len(raw) < 8:
        raise DamagedEntry("shorter than a safetensors header")
    length = int.from_bytes(raw[:8], "little")
    if length > _MAX_HEADER or 8 + length > size or len(raw) < 8 + length:
        raise DamagedEntry("header length is out of range")
    header = json.loads(raw[8 : 8 + length])
    if not isinstance(header, dict):
        raise DamagedEntry("header is not a JSON object")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise DamagedEntry("file length does not match its header (truncated?)")
    if key is not None and (header.get("__metadata__") or {}).get(KEY_FIELD) != key:
        raise DamagedEntry("key recorded in the file does not match its name")
    return header


def _read_header(file: str) -> tuple[bytes, int]:
    """The first bytes of `file` (length prefix and header, as far as the file allows) and its size."""
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        raw = handle.read(8)
        if len(raw) == 8:
            raw += handle.read(min(int.from_bytes(raw, "little"), size))
        return raw, size


class CacheStore:
    """Entries live at `root/<kind>/<key[:2]>/<key>.safetensors`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return Path(self._file(kind, key))

    def _file(self, kind: str, key: str) -> str:
        return f"{self.root}{os.sep}{kind}{os.sep}{key[:2]}{os.sep}{key}.safetensors"

    def contains(self, kind: str, key: str) -> bool:
        """True when a complete entry recording `key` exists; a damaged or misplaced file is removed.

        Only the header is read (cheap). safetensors has no checksums, so damage inside tensor data that
        keeps the file's length is caught later by `load` if the tensors cannot be built, or not at all.
        """
        file = self._file(kind, key)
        try:
            raw, size = _read_header(file)
            _check_header(raw, size, key)
            return True
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        except Exception as error:  # an unreadable header is a miss
            self._discard(file, error)
            return False

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is missing or damaged (a damaged file is removed)."""
        file = self._file(kind, key)
        try:
            with open(file, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            _check_header(data, len(data), key)
            return load_bytes(data)
        except Exception as error:  # any unreadable file is a miss, never a crash
            self._discard(file, error)
            return None

    @staticmethod
    def _discard(file: str, error: BaseException) -> None:
        log.warning("cache entry %s is damaged (%s); it will be rebuilt", file, error)
        Path(file).unlink(missing_ok=True)

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
        file = self._file(kind, key)
        try:
            raw, size = _read_header(file)
            return json.loads((_check_header(raw, size, None).get("__metadata__") or {}).get(FIELDS_FIELD, "{}"))
        except Exception:
            return None

    def entries(self, kind: str) -> list[Path]:
        return sorted((self.root / kind).glob("*/*.safetensors"))
