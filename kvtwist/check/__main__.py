"""``python -m kvtwist.check HOST PORT ...`` is the same as ``kvtwist-check HOST PORT ...``."""

from kvtwist.check.cli import main

main()
