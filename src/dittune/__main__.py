"""`python -m dittune` runs the command line."""

from dittune.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
