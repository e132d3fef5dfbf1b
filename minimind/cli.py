"""Command-line plumbing shared by every script: bad input ends in one line, `error: ...`, never a traceback."""
from __future__ import annotations

import sys

from tqdm import tqdm

from .errors import MiniMindError, UsageError

__all__ = ["run", "UsageError"]  # UsageError: scripts raise cli.UsageError for a bad flag


def run(main) -> None:
    """Call main(); turn our input errors into `error: MESSAGE` on stderr and exit status 2."""
    try:
        main()
    except MiniMindError as e:
        bars = list(getattr(tqdm, "_instances", ()))
        for bar in bars:  # a progress bar cut short must not share the error's line
            bar.close()
        if bars and not sys.stderr.isatty():
            print(file=sys.stderr)  # a log file keeps the bar's carriage returns: start a fresh line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
