"""A content-addressed store of tensor dicts in safetensors files, each carrying a checksum of its tensors.

An entry's key is a hash of everything that produced it, so a changed input simply misses and a
stale entry can never be returned. Writes are atomic (temporary file, then rename), and every file
records its own key and a SHA-256 of its tensors (names, dtypes, shapes, offsets and bytes), so a damaged,
truncated or misplaced file is detected and treated as a miss: it is reported (path and reason), deleted,
and re-encoded by the next cache build.

Reads parse the safetensors header directly (8-byte length, JSON). `load` reads the whole file and verifies
the checksum before building the tensors. `contains` verifies it too by default (reading every byte, which
costs about 1 s per GB of cache); `verify=False` reads only the header (length, key, checksum present).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes

from dittune.safetensors_bytes import safetensors_bytes

log = logging.getLogger(__name__)

KEY_FIELD = "dittune_cache_key"
FIELDS_FIELD = "dittune_cache_fields"
CHECKSUM_FIELD = "dittune_cache_sha256"
"""SHA-256 (hex) of every tensor's name, dtype, shape and bytes, in name order; see `tensors_digest`."""
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_METADATA = "__metadata__"


class DamagedEntry(ValueError):
    """A cache file that is not a complete safetensors file recording the expected key and checksum."""


_DTYPE_TAGS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""safetensors' names of the dtypes an entry may hold."""


def tensors_digest(tensors: list[tuple[str, str, list[int], memoryview | bytes]]) -> str:
    """SHA-256 (hex) of (name, safetensors dtype, shape, little-endian bytes) of every tensor, in name order.

    The dtype and shape are hashed too, so a header edit that keeps the file valid is caught like a flipped bit."""
    digest = hashlib.sha256()
    for name, dtype, shape, data in sorted(tensors, key=lambda item: item[0]):
        digest.update(json.dumps([name, dtype, list(shape), len(data)]).encode())
        digest.update(data)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _check_header(raw: bytes, size: int, key: str | None) -> dict[str, Any]:
    """The parsed header (`raw` = the file's first bytes, at least the header) of a complete file of `size` bytes."""
    if len(raw) < 8:
        raise DamagedEntry("shorter than a safetensors header")
    length = int.from_bytes(raw[:8], "little")
    if length > _MAX_HEADER or 8 + length > size or len(raw) < 8 + length:
        raise DamagedEntry("header length is out of range (truncated?)")
    try:
        header = json.loads(raw[8 : 8 + length])
    except ValueError as error:
        raise DamagedEntry(f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise DamagedEntry("header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != _METADATA), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise DamagedEntry("header has a malformed tensor entry") from None
    if 8 + length + end != size:
        raise DamagedEntry("file length does not match its header (truncated?)")
    metadata = header.get(_METADATA) or {}
    if key is not None and metadata.get(KEY_FIELD) != key:
        raise DamagedEntry("key recorded in the file does not match its name")
    if not metadata.get(CHECKSUM_FIELD):
        raise DamagedEntry("no checksum recorded (not written by this version of dittune)")
    return header


def _check_payload(data: bytes, header: dict[str, Any]) -> None:
    """Raises DamagedEntry unless the tensors in `data` (the whole file) match the checksum in `header`."""
    base, view = 8 + int.from_bytes(data[:8], "little"), memoryview(data)
    try:
        tensors = [
            (name, info["dtype"], info["shape"], view[base + info["data_offsets"][0] : base + info["data_offsets"][1]])
            for name, info in header.items()
            if name != _METADATA
        ]
    except (KeyError, IndexError, TypeError):
        raise DamagedEntry("header has a malformed tensor entry") from None
    if tensors_digest(tensors) != header[_METADATA][CHECKSUM_FIELD]:
        raise DamagedEntry("checksum mismatch: the tensor data changed after it was written")


def _read_header(file: str) -> tuple[bytes, int]:
    """The first bytes of `file` (length prefix and header, as far as the file allows) and its size."""
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        raw = handle.read(8)
        if len(raw) == 8:
            raw += handle.read(min(int.from_bytes(raw, "little"), size))
        return raw, size


def _read_verified(file: str, key: str) -> bytes:
    """The whole file, checked (header, length, key, checksum); raises DamagedEntry or OSError."""
    with open(file, "rb") as handle:
        data = handle.read()
    _check_payload(data, _check_header(data, len(data), key))
    return data


_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class CacheStore:
    """Entries live at `root/<kind>/<key[:2]>/<key>.safetensors`.

    `damaged` lists (path, reason) of every entry this store found damaged and deleted (each is also logged
    as a warning), so cache builds can report them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.damaged: list[tuple[Path, str]] = []

    def path(self, kind: str, key: str) -> Path:
        return Path(self._file(kind, key))

    def _file(self, kind: str, key: str) -> str:
        return f"{self.root}{os.sep}{kind}{os.sep}{key[:2]}{os.sep}{key}.safetensors"

    def contains(self, kind: str, key: str, *, verify: bool = True) -> bool:
        """True when a complete, intact entry recording `key` exists; a damaged or misplaced file is deleted.

        `verify` reads the whole file and checks its checksum (about 1 s per GB); without it only the header
        is read (length, key and checksum present), and damage inside the data is left for `load` to find.
        """
        file = self._file(kind, key)
        try:
            if verify:
                _read_verified(file, key)
            else:
                raw, size = _read_header(file)
                _check_header(raw, size, key)
            return True
        except _ABSENT:
            return False
        except Exception as error:  # an unreadable or damaged file is a miss
            self._discard(file, error)
            return False

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors after checking its checksum, or None when it is missing or damaged (a damaged
        file is deleted and reported: corrupt data is never returned)."""
        file = self._file(kind, key)
        try:
            return load_bytes(_read_verified(file, key))
        except _ABSENT:
            return None
        except Exception as error:  # any unreadable file is a miss, never a crash
            self._discard(file, error)
            return None

    def _discard(self, file: str, error: BaseException) -> None:
        log.warning("damaged cache entry deleted: %s (%s); the next cache fill re-encodes it", file, error)
        self.damaged.append((Path(file), str(error)))
        try:
            Path(file).unlink(missing_ok=True)
        except OSError as unlink_error:  # e.g. a folder in its place, or a read-only cache
            log.warning("could not delete %s: %s", file, unlink_error)

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], fields: dict) -> Path:
        """Write an entry atomically, with its key, `fields` (for reports) and the checksum of its tensors."""
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
        unknown = {value.dtype for value in tensors.values()} - _DTYPE_TAGS.keys()
        if unknown:
            raise ValueError(f"cache entries cannot hold {', '.join(sorted(map(str, unknown)))} tensors")
        described = [(n, _DTYPE_TAGS[t.dtype], list(t.shape), _tensor_bytes(t)) for n, t in tensors.items()]
        metadata = {
            KEY_FIELD: key,
            FIELDS_FIELD: json.dumps(fields, sort_keys=True, default=str),
            CHECKSUM_FIELD: tensors_digest(described),
        }
        data = safetensors_bytes(tensors, metadata)  # sorted header: equal entries have equal bytes
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as error:
            if error.errno is None:
                raise
            advice = f"check that {self.root} is writable and has free space, or set cache.dir"
            raise OSError(error.errno, f"cannot write cache entry {path}: {error.strerror}; {advice}") from error
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def fields(self, kind: str, key: str) -> dict | None:
        """The key fields an entry was stored with (for debugging and `dittune cache` reports)."""
        file = self._file(kind, key)
        try:
            raw, size = _read_header(file)
            return json.loads((_check_header(raw, size, None).get(_METADATA) or {}).get(FIELDS_FIELD, "{}"))
        except Exception:
            return None

    def entries(self, kind: str) -> list[Path]:
        return sorted((self.root / kind).glob("*/*.safetensors"))
