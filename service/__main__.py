"""`python -m service`: the same command line as `inngest-outbox`."""

from .cli import main

raise SystemExit(main())
