"""`python -m phema`: the command line."""

from phema.cli import main

raise SystemExit(main())
