"""Regenerate the docs generated from code: README.md's configuration reference (from the schema) and
docs/formats.md's key maps (from the family layouts).

python scripts/update_readme.py            # rewrite them in place
python scripts/update_readme.py --check    # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dittune.config.docs import update_readme_section
from dittune.export.formats_doc import update_section as update_formats_section

ROOT = Path(__file__).resolve().parents[1]
GENERATED: tuple[tuple[Path, str, Callable[[str], str]], ...] = (
    (ROOT / "README.md", "config reference", update_readme_section),
    (ROOT / "docs" / "formats.md", "key maps", update_formats_section),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are current")
    args = parser.parse_args(argv)
    stale = 0
    for path, what, update in GENERATED:
        current = path.read_text(encoding="utf-8")
        fresh = update(current)
        if fresh == current:
            print(f"{path.name}: {what} up to date")
        elif args.check:
            print(f"{path.name}: {what} out of date; run python scripts/update_readme.py", file=sys.stderr)
            stale += 1
        else:
            path.write_text(fresh, encoding="utf-8")
            print(f"{path.name}: {what} regenerated")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
