"""`python -m skipcache ...` is the `skipcache` command (for interpreters without the entry point on PATH)."""

from skipcache.cli import main

main()
