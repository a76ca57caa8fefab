"""Reading a JSON file whose absence or damage gets an error naming the file, line and column."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], missing_hint: str = "") -> Any:
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
