"""Text sources: the built-in pydoc corpus, plain text files, JSONL and Parquet files.

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


ROW_FILES = (".jsonl", ".parquet")


def records(path: Path):
    """(where, row) per row of a .jsonl or .parquet file, where is "FILE:LINE" or "FILE, row N".
    A JSONL line that is not JSON comes as a DataError in place of its row (the caller decides
    whether that stops the run); blank lines are skipped."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        n = 0
        for batch in batches:
            for row in batch.to_pylist():  # nested lists/structs (chat messages) as list/dict
                n += 1
                yield f"{path}, row {n}", row
        return
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = DataError(f"not valid JSON ({e.msg}, column {e.colno})")
        yield f"{path}:{line_no}", row


def read_field(path: Path, field: str) -> list[str]:
    """The `field` string of each row of a .jsonl or .parquet file."""
    docs = []
    for where, row in records(path):
        if isinstance(row, DataError):
            raise DataError(f"{where}: {row}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with a {field!r} field, "
                            f"got {type(row).__name__}")
        if field not in row:
            raise DataError(f"{where}: missing text field {field!r} "
                            f"(fields: {', '.join(map(str, row)) or 'none'}; set data.text_field)")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} is "
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
                if path.suffix in ROW_FILES:
                    docs += read_field(path, data_cfg.text_field)
                elif path.suffix == ".json":
                    raise DataError(f"{path}: .json is not a supported format; write one JSON "
                                    f"object per line to a .jsonl file")
                else:
                    docs += read_text(path, data_cfg.split_paragraphs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.sources: {list(data_cfg.sources)} hold no text (empty corpus)")
    return docs
