"""Text sources: the built-in pydoc corpus, plain text files, and JSONL files."""
from __future__ import annotations

import glob
import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data, with the file/line/field in the message."""


def builtin_pydoc() -> list[str]:
    """The English text of Python's own help topics (ships with every CPython)."""
    from pydoc_data.topics import topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _expand(source: str) -> list[Path]:
    if any(c in source for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(source, recursive=True))
        if not paths:
            raise DataError(f"data.sources: {source!r} matches no files")
        return paths
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.sources: {source}: file not found")
    return [path]


def read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{line_no}: missing text field {field!r} "
                                f"(set data.text_field)")
            if not isinstance(row[field], str):
                raise DataError(f"{path}:{line_no}: field {field!r} is "
                                f"{type(row[field]).__name__}, expected a string")
            docs.append(row[field])
    return docs


def read_text(path: Path, split_paragraphs: bool) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if not split_paragraphs:
        return [text]
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def read_documents(data_cfg) -> list[str]:
    """All documents of data_cfg.sources, in a fixed order; empty documents dropped."""
    docs: list[str] = []
    for source in data_cfg.sources:
        if source == "builtin:pydoc":
            docs += builtin_pydoc()
        elif source.startswith("builtin:"):
            raise DataError(f"data.sources: unknown built-in corpus {source!r} (known: builtin:pydoc)")
        else:
            for path in _expand(source):
                if path.suffix == ".jsonl":
                    docs += read_jsonl(path, data_cfg.text_field)
                else:
                    docs += read_text(path, data_cfg.split_paragraphs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.sources: {list(data_cfg.sources)} hold no text (empty corpus)")
    return docs
