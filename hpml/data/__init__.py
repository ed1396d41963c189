"""Data loading and generation; `read_json` is the one JSON file reader, so every bad file fails alike."""
from __future__ import annotations

import json
from typing import Any

from hpml.errors import HpmlError


def read_json(path: str, what: str, missing_hint: str) -> Any:
    """Parse a JSON file; any failure is one HpmlError line naming the file, the problem and the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HpmlError(f"{path}: no such file; {missing_hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HpmlError(f"{path}: cannot read the file ({e}); check the path and permissions") from None
    except json.JSONDecodeError as e:
        raise HpmlError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        f"give {what} as a JSON file") from None
