"""`python -m dittune` runs the command line."""

from dittune.cli.main import run

if __name__ == "__main__":
    run()
