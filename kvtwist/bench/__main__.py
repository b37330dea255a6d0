"""``python -m kvtwist.bench``: run the benchmark; ``--help`` lists the options."""

from kvtwist.bench.cli import main

raise SystemExit(main())
