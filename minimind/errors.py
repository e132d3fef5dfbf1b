"""The errors a user can cause, in one place: every script prints them as one line, `error: ...`, exit status 2.

This module imports nothing of ours: everything may raise these, and `cli.run` catches the base class.
Each message names where the problem is (FILE[:LINE] or --flag), what is wrong, and what to do.
"""


class MiniMindError(ValueError):
    """Base of every error caused by the user's input (flags, files, a run that cannot go on)."""


class UsageError(MiniMindError):
    """A flag or combination of flags that cannot work; the message names the flag."""


class DataError(MiniMindError):
    """Bad input data. str(e) is 'FILE:LINE: what is wrong' (the CLI prints 'error: ' + that)."""


class CheckpointError(MiniMindError):
    """A model directory, weight file or tokenizer that cannot be loaded; the message names the file."""


class TrainingError(MiniMindError):
    """The run cannot go on (e.g. the loss became NaN)."""
