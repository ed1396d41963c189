"""Data loading and generation; `read_json` is the one JSON file reader, so every bad file fails alike."""
from __future__ import annotations

import json
from typing import Any

from hpml.errors import HpmlError


def read_json(path: str, what: str, missing_hint: str) -> Any:
    """Parse a JSON file; any failure is one HpmlError line naming the file, the problem and the fix."""
    from hpml.validate import read_text

    text = read_text(path, what, missing_hint)  # one line for a missing, unreadable or non-UTF-8 file
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HpmlError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        f"give {what} as a JSON file") from None
