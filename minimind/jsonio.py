"""Reading JSON files with one-line errors: a whole-file JSON object (configs), or JSON lines (datasets).

Every reader of a user's file goes through here, so a bad file always reads `FILE[:LINE]: what is wrong`.
"""
from __future__ import annotations

import json
import os

from .errors import DataError


def read_json_object(path: str, error=DataError, hint: str = "") -> dict:
    """The JSON object in `path`; `error` (an errors.py class) naming the file if it is missing, not JSON, or
    not an object. hint: what to do, appended to the message."""
    tail = f"; {hint}" if hint else ""
    if not os.path.isfile(path):
        raise error(f"{path}: no such file{tail}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({getattr(e, 'msg', e)}){tail}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object{tail}")
    return obj


def check_file(path: str) -> None:
    """A data file must exist and be a file: say which and what to do, before anything opens it."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; pass the JSONL file inside it (--data_path FILE)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def json_lines(path: str):
    """(line number, raw bytes, parsed value) for each non-blank line; DataError('FILE:LINE: invalid JSON')."""
    check_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are harmless
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({getattr(e, 'msg', e)})") from None
            yield lineno, raw, obj
