"""`python -m slidejax ...` runs the command line (see `slidejax.cli`)."""

from slidejax.cli import main

raise SystemExit(main())
