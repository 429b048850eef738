"""`python -m safe_cache.cli ...` is `safe-cache ...`."""

from . import main

main()
