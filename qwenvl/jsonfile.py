"""Reading the JSON files of checkpoint and run folders: one object each, every failure naming the file."""
from __future__ import annotations

import json


def read_json_object(path: str) -> dict:
    """The JSON object in file `path`; ValueError naming the file when it is not UTF-8, not JSON, or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it the right file?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix or restore "
                         f"it") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold one JSON object, got a {type(content).__name__}")
    return content
