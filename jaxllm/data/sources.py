"""Text sources: the built-in pydoc corpus, plain text files, and JSONL files.

`read_documents(data_cfg)` returns every document of `data_cfg.sources` as a list of strings,
in a fixed order (sources as listed, glob matches sorted, lines/paragraphs in file order), so
that everything downstream (the eval split, packing, shuffling) is a function of the config.
Every problem with the input is a `DataError` naming the source, file and line."""
from __future__ import annotations

import glob
import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data, with the file/line/field in the message."""


BUILTINS = ("builtin:pydoc",)


def builtin_pydoc() -> list[str]:
    """The English text of Python's own help topics (ships with every CPython): one document
    per topic, in sorted topic order."""
    from pydoc_data.topics import topics
    return [topics[k].strip() for k in sorted(topics)]


def expand(source: str) -> list[Path]:
    """The files a source names: a path, or a glob (recursive `**` allowed) in sorted order."""
    if any(c in source for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not paths:
            raise DataError(f"data.sources: {source!r} matches no files")
        return paths
    path = Path(source)
    if path.is_dir():
        raise DataError(f"data.sources: {source}: is a directory (use a glob, e.g. {source}/*.txt)")
    if not path.is_file():
        raise DataError(f"data.sources: {source}: file not found")
    return [path]


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: a leading byte-order mark is not part of the text.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def read_jsonl(path: Path, field: str) -> list[str]:
    """The `field` string of each line's JSON object; blank lines are skipped."""
    docs = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object with a {field!r} field, "
                            f"got {type(row).__name__}")
        if field not in row:
            raise DataError(f"{path}:{line_no}: missing text field {field!r} "
                            f"(fields: {', '.join(map(str, row)) or 'none'}; set data.text_field)")
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{line_no}: field {field!r} is "
                            f"{type(row[field]).__name__}, expected a string")
        docs.append(row[field])
    return docs


def read_text(path: Path, split_paragraphs: bool) -> list[str]:
    """One document per file, or one per blank-line-separated block."""
    text = _read_text(path)
    if not split_paragraphs:
        return [text]
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def read_documents(data_cfg) -> list[str]:
    """All documents of data_cfg.sources, in a fixed order; blank documents are dropped."""
    if not data_cfg.sources:
        raise DataError("data.sources: no sources given (empty corpus)")
    docs: list[str] = []
    for source in data_cfg.sources:
        if source == "builtin:pydoc":
            docs += builtin_pydoc()
        elif source.startswith("builtin:"):
            raise DataError(f"data.sources: unknown built-in corpus {source!r} "
                            f"(known: {', '.join(BUILTINS)})")
        else:
            for path in expand(source):
                if path.suffix == ".jsonl":
                    docs += read_jsonl(path, data_cfg.text_field)
                elif path.suffix == ".json":
                    raise DataError(f"{path}: .json is not a supported format; write one JSON "
                                    f"object per line to a .jsonl file")
                else:
                    docs += read_text(path, data_cfg.split_paragraphs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.sources: {list(data_cfg.sources)} hold no text (empty corpus)")
    return docs
