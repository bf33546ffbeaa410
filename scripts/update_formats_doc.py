"""Regenerate docs/formats.md's key-map tables from the family layouts.

python scripts/update_formats_doc.py            # rewrite docs/formats.md in place
python scripts/update_formats_doc.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dittune.export.formats_doc import update_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether docs/formats.md is current")
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    fresh = update_section(current)
    if fresh == current:
        print(f"{DOC.name}: key maps are up to date")
        return 0
    if args.check:
        print(f"{DOC.name}: key maps are out of date; run python scripts/update_formats_doc.py", file=sys.stderr)
        return 1
    DOC.write_text(fresh, encoding="utf-8")
    print(f"{DOC.name}: key maps regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
