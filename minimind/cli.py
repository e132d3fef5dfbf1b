"""Command-line plumbing shared by every script: bad input ends in one line, `error: ...`, never a traceback."""
from __future__ import annotations

import sys


class UsageError(ValueError):
    """A flag or combination of flags that cannot work; the message names the flag."""


def run(main) -> None:
    """Call main(); turn our input errors into `error: MESSAGE` on stderr and exit status 2."""
    from .checkpoint import CheckpointError
    from .data import DataError
    try:
        main()
    except (DataError, CheckpointError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
