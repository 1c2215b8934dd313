"""`python -m worker` is `cola-worker`."""

from worker.cli import main

raise SystemExit(main())
