"""`python -m agent` is the same as the `edge-agent` console script."""

from agent.cli.main import main

raise SystemExit(main())
