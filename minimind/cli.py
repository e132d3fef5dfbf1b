"""Command-line plumbing shared by every script: bad input ends in one line, `error: ...`, never a traceback."""
from __future__ import annotations

import sys

from .errors import MiniMindError, UsageError

__all__ = ["run", "UsageError"]  # UsageError: scripts raise cli.UsageError for a bad flag


def run(main) -> None:
    """Call main(); turn our input errors into `error: MESSAGE` on stderr and exit status 2."""
    try:
        main()
    except MiniMindError as e:
        sys.stderr.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
