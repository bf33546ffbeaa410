"""Regenerate the README's configuration reference from the schema.

python scripts/update_readme.py            # rewrite README.md in place
python scripts/update_readme.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dittune.config.docs import update_readme_section

README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is current")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    fresh = update_readme_section(current)
    if fresh == current:
        print(f"{README.name}: config reference is up to date")
        return 0
    if args.check:
        print(f"{README.name}: config reference is out of date; run python scripts/update_readme.py", file=sys.stderr)
        return 1
    README.write_text(fresh, encoding="utf-8")
    print(f"{README.name}: config reference regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
