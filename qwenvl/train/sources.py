"""Where training records come from: a data file (JSON list or JSON lines) or the built-in synthetic set.

A source answers three questions by index: `record(i)` (the text, cheap), `images(i)` (the pictures of that record,
in the order of its `<img>` spans; done in DataLoader workers) and `len()`. Sources never tokenize.
"""
from __future__ import annotations

import json
import os
import re

from .formatting import MalformedRecord, record_id
from .synthetic import SyntheticTasks

_IMG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def read_records(path) -> list:
    """Records of a JSON file holding a list, or of a JSON-lines file (one object per line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (or pass --data synthetic)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at line {line}): save it as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                # a JSON-lines file with one bad line: name the line; the record has no readable id
                records.append({"id": f"{os.path.basename(path)}:{n}", "_error": f"line {n} is not valid JSON ({e})"})
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records (or one JSON object per line)")
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def image_refs(record) -> list[str]:
    """The image paths a record names, in order: its `image` field, or the `<img>` tags of its user turns."""
    if isinstance(record, dict) and "caption" in record:
        return [record["image"]] if isinstance(record.get("image"), str) else []
    conv = record.get("conversations") if isinstance(record, dict) else None
    refs = []
    for turn in conv if isinstance(conv, list) else []:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            refs += _IMG.findall(turn["value"])
    return refs


class FileSource:
    """Records of a data file; relative image paths are read under `root` (default: the file's folder)."""

    def __init__(self, path, root=None):
        self.path = os.fspath(path)
        self.records = read_records(self.path)
        self.root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.path))

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> dict:
        r = self.records[i]
        if isinstance(r, dict) and "_error" in r:
            raise MalformedRecord(r["id"], r["_error"])
        return r

    def resolve(self, ref: str) -> str:
        return ref if os.path.isabs(ref) else os.path.join(self.root, ref)

    def check_images(self, i: int) -> None:
        """Refuse early a record whose image files are missing (a cheap stat, not a decode)."""
        for ref in image_refs(self.records[i]):
            if not os.path.isfile(self.resolve(ref)):
                raise MalformedRecord(record_id(self.records[i], i), f"image file not found: {self.resolve(ref)}")

    def images(self, i: int) -> list:
        return [self.resolve(ref) for ref in image_refs(self.records[i])]


class SyntheticSource:
    """The built-in synthetic set as a source: its image names resolve to pictures drawn on demand."""

    def __init__(self, tasks: SyntheticTasks):
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def record(self, i: int) -> dict:
        return self.tasks.record(i)

    def check_images(self, i: int) -> None:
        pass

    def images(self, i: int) -> list:
        return [self.tasks.image(i)]
