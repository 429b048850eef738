"""`python cli.py ...` is `safe-cache ...`: a shim for running from a checkout."""

from safe_cache.cli import main

if __name__ == "__main__":
    main(prog_name="safe-cache")
