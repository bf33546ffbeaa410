"""Run a training script with the torchvision shim importable by that script only: `run_peer.py SCRIPT [ARGS...]`.

Libraries probe for torchvision (`importlib.util.find_spec`) and, when they find it, import parts of it that the
shim does not have (transformers' image utilities). The finder installed here therefore answers for `torchvision`
only when the import comes from the script itself (module `__main__`) — the library probes still see no torchvision,
exactly as without the shim — and the script then runs as `__main__` via `runpy`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

SHIMS = str(Path(__file__).resolve().parent)


def _importer(frame: FrameType | None) -> str:
    """`__name__` of the first frame outside the import machinery."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen") or Path(filename).parent.name == "importlib"):
            return str(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    return ""


class ShimFinder(importlib.abc.MetaPathFinder):
    """Finds `torchvision` in benchmarks/shims, for imports made by `__main__` only."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" or _importer(sys._getframe(1)) != "__main__":
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [SHIMS])


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: run_peer.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    # python put this folder (which holds the shim) first on sys.path; the script's own folder replaces it
    sys.path[:] = [str(Path(script).resolve().parent)] + [
        p for p in sys.path[1:] if p and Path(p).resolve() != Path(SHIMS)
    ]
    sys.meta_path.insert(0, ShimFinder())
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
