"""Where training rows come from: data files and `datasets` directories, read as a stream of chunks.

data.path (and data.val_path) is a file, a directory, or a list of them:

- `.jsonl` files, one JSON object per line, optionally compressed: `.jsonl.gz` (gzip) or `.jsonl.zst`
  (Zstandard; needs `pip install zstandard`, or megastream[zstd]);
- `.parquet` files, one row per record, columns as the JSON keys;
- a directory of such files (every supported suffix, in name order);
- a directory written by Hugging Face `datasets`' `save_to_disk`: a Dataset, or a DatasetDict whose
  `train` split is read (data.split picks another). Reading it needs only pyarrow, not `datasets`.

Files are streamed (never read whole into memory), in order; messages name `file:line` for jsonl and
`file:row N` for parquet and `datasets` shards, both counted from 1 (blank jsonl lines count as lines
but hold no row). Null parquet / `datasets` values are dropped, as if the key were absent.

Each row is then put into one of megastream's shapes: `{"input_ids": [...]}` (optionally with
`"labels"`), `{"text": ...}`, `{"messages": [...]}` or `{"prompt": ..., "completion": ...}`:

1. data.columns renames fields first: `{megastream field: your field}`, e.g. `{text: body}` or
   `{prompt: question, completion: answer}`; a row lacking a mapped field is an error.
2. Alpaca rows (`instruction`, `output`, optional `input` and `system`) become
   `{"prompt": instruction + "\\n\\n" + input (when input is not empty), "completion": output}`;
   a `system` field is kept as is, for the loader.
3. ShareGPT rows (`conversations: [{"from", "value"}, ...]`) become `{"messages": [{"role", "content"}, ...]}`,
   `from` human -> user, gpt -> assistant, system -> system (user, assistant and tool are kept);
   a top-level `system` string becomes a leading system message (unless the first turn is one).

Rows already in megastream's shapes pass through unchanged; their contents are validated by the loader.
This module imports neither torch nor `datasets` (it runs in data worker processes).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from megastream.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_SHAPES = ("input_ids", "text", "messages", "prompt")  # a row with one of these is already megastream's
_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}


@dataclass(frozen=True)
class Source:
    path: Path  # the file read: a data file, or one .arrow shard of a `datasets` save_to_disk directory
    kind: str  # "jsonl" | "jsonl.gz" | "jsonl.zst" | "parquet" | "arrow"
    label: str  # how messages name it

    def where(self, n: int) -> str:
        """Line n (jsonl kinds) or row n (parquet, arrow) of this source, 1-based, for messages."""
        return f"{self.label}:{n}" if self.kind.startswith("jsonl") else f"{self.label}:row {n}"


@dataclass
class Chunk:
    source: int  # index into the list_sources() list
    first: int  # line (jsonl) or row number of payload[0], 1-based
    payload: object  # jsonl: list[bytes], the raw lines, blank ones included; parquet / arrow: a pyarrow.RecordBatch


def _kind(path: Path) -> str | None:
    return next((s[1:] for s in SUFFIXES if path.name.endswith(s)), None)


def list_sources(path, split: str = "train") -> list[Source]:
    """The sources a data path names, in reading order: `path` is a file, a directory, or a list of them."""
    out: list[Source] = []
    for p in map(Path, [path] if isinstance(path, (str, Path)) else path):
        if p.is_dir():
            out += _dir_sources(p, split)
        elif not p.exists():
            raise DataError(f"{p} does not exist; give a data file ({', '.join(SUFFIXES)}), a "
                            "directory of them, a `datasets` save_to_disk directory, or a list of these")
        elif _kind(p) is None:
            hint = " (point at the directory that holds it)" if p.suffix == ".arrow" else ""
            raise DataError(f"{p}: unsupported file type; megastream reads {', '.join(SUFFIXES)} files and "
                            f"`datasets` save_to_disk directories{hint}")
        else:
            out.append(Source(p, _kind(p), str(p)))
    zst = [s for s in out if s.kind == "jsonl.zst"]
    if zst:
        _zstandard(zst[0])  # without zstandard, fail before any reading starts
    return out


def data_files(path, split: str = "train") -> list[Path]:
    """The files read for a data path (for sizing them): data files and `datasets` .arrow shards."""
    return [s.path for s in list_sources(path, split)]


def _dir_sources(d: Path, split: str) -> list[Source]:
    if (d / "dataset_dict.json").is_file():  # a DatasetDict: one subdirectory per split
        splits = _json(d / "dataset_dict.json").get("splits") or []
        if split not in splits:
            raise DataError(f"{d}: the `datasets` DatasetDict has no split {split!r} (it has: "
                            f"{', '.join(map(str, splits)) or 'none'}); set data.split to one of them")
        d = d / split
        if not (d / "state.json").is_file():
            raise DataError(f"{d / 'state.json'} is missing: dataset_dict.json lists split {split!r}; save the "
                            "dataset again")
    if (d / "state.json").is_file():  # a Dataset: state.json lists its arrow shards in order
        try:
            shards = [d / f["filename"] for f in _json(d / "state.json")["_data_files"]]
        except (KeyError, TypeError):
            raise DataError(f"{d / 'state.json'}: no \"_data_files\" list of {{\"filename\"}} entries; the "
                            "directory was not written by `datasets` save_to_disk, or is damaged") from None
        for f in shards:
            if not f.is_file():
                raise DataError(f"{f} is missing: {d / 'state.json'} lists it; save the dataset again")
        return [Source(f, "arrow", str(f)) for f in shards]
    try:
        files = sorted((f for f in d.iterdir() if f.is_file() and _kind(f)), key=lambda f: f.name)
    except OSError as e:
        raise DataError(f"cannot list directory {d}: {e.strerror}") from None
    if not files:
        raise DataError(f"directory {d} holds no data files ({', '.join(SUFFIXES)}) and is not a `datasets` "
                        "save_to_disk directory (no state.json or dataset_dict.json)")
    return [Source(f, _kind(f), str(f)) for f in files]


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); the `datasets` directory is damaged, save it again") from None


def _zstandard(source: Source):
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{source.label}: reading .jsonl.zst needs the zstandard package: pip install zstandard "
                        "(or megastream[zstd]); or decompress the file (zstd -d) and use the .jsonl") from None
    return zstandard


def read_chunks(sources: list[Source], chunk_bytes: int = 4 << 20, chunk_rows: int = 4096) -> Iterator[Chunk]:
    """Every source in order as chunks: about chunk_bytes of raw jsonl lines, or at most chunk_rows rows."""
    for i, s in enumerate(sources):
        if s.kind == "parquet":
            yield from _parquet_chunks(i, s, chunk_rows)
        elif s.kind == "arrow":
            yield from _arrow_chunks(i, s, chunk_rows)
        else:
            yield from _jsonl_chunks(i, s, chunk_bytes)


def _jsonl_chunks(i: int, s: Source, chunk_bytes: int) -> Iterator[Chunk]:
    errors: tuple = (OSError, EOFError, zlib.error)  # gzip: BadGzipFile (an OSError), truncation, bad data
    try:
        raw = s.path.open("rb")
    except OSError as e:
        raise DataError(f"cannot open {s.label}: {e.strerror}") from None
    with raw:
        f = raw
        if s.kind == "jsonl.gz":
            f = gzip.open(raw, "rb")
        elif s.kind == "jsonl.zst":
            zstd = _zstandard(s)
            errors += (zstd.ZstdError,)
            f = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        lines, size, n = [], 0, 0
        try:
            for n, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield Chunk(i, n - len(lines) + 1, lines)
                    lines, size = [], 0
        except errors as e:
            raise DataError(f"{s.label}: cannot read as {s.kind}{_after('line', n)} ({e}); the file is corrupt, "
                            f"truncated or not {s.kind}") from None
        if lines:
            yield Chunk(i, n - len(lines) + 1, lines)


def _parquet_chunks(i: int, s: Source, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(s.path).iter_batches(batch_size=chunk_rows):
            yield Chunk(i, n + 1, batch)
            n += batch.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for bad files
        raise DataError(f"{s.label}: cannot read as parquet{_after('row', n)} ({e}); the file is corrupt or not "
                        "parquet") from None


def _arrow_chunks(i: int, s: Source, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow as pa

    n = 0
    try:
        with pa.ipc.open_stream(pa.memory_map(str(s.path))) as reader:
            for batch in reader:
                for off in range(0, batch.num_rows, chunk_rows):
                    part = batch
                    if batch.num_rows > chunk_rows:  # a slice pickles its parent's buffers whole: copy it
                        part = batch.slice(off, chunk_rows)
                        part = part.take(pa.array(range(part.num_rows), pa.int64()))
                    yield Chunk(i, n + 1, part)
                    n += part.num_rows
    except Exception as e:  # ArrowInvalid / OSError for truncated or foreign files
        raise DataError(f"{s.label}: cannot read as an Arrow stream (a `datasets` save_to_disk shard)"
                        f"{_after('row', n)} ({e}); the file is corrupt, save the dataset again") from None


def _after(unit: str, n: int) -> str:
    return f" after {unit} {n}" if n else ""


def chunk_rows(chunk: Chunk, source: Source, columns: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(n, row) for each non-blank row of a chunk, n its line / row number, the row in megastream's shapes."""
    rows = _jsonl_rows(chunk, source) if source.kind.startswith("jsonl") else _batch_rows(chunk)
    for n, row in rows:
        yield n, normalise(row, source.where(n), columns)


def _jsonl_rows(chunk: Chunk, source: Source) -> Iterator[tuple[int, object]]:
    for n, raw in enumerate(chunk.payload, chunk.first):
        where = source.where(n)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            packed = {b"\x1f\x8b": ".jsonl.gz", b"\x28\xb5": ".jsonl.zst"}.get(raw[:2]) if n == 1 else None
            hint = f" (it looks compressed: name it {packed})" if packed else ""
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8{hint}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # some messages end in "at" ("Unterminated string starting at")
            what = e.msg.removesuffix(" at")
            raise DataError(f"{where}: not valid JSON ({what} at column {e.colno}); each line must be one "
                            'JSON object such as {"input_ids": [1, 2, 3]} or {"text": "..."}') from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _batch_rows(chunk: Chunk) -> Iterator[tuple[int, dict]]:
    batch = chunk.payload
    names, cols = batch.schema.names, [batch.column(k).to_pylist() for k in range(batch.num_columns)]
    for k in range(batch.num_rows):
        yield chunk.first + k, {name: col[k] for name, col in zip(names, cols) if col[k] is not None}


def normalise(row: dict, where: str, columns: Mapping[str, str] | None = None) -> dict:
    """One row in megastream's shapes: data.columns renames, then Alpaca and ShareGPT rows are converted."""
    if columns:
        missing = [f for f, theirs in columns.items() if theirs not in row]
        if missing:
            f = missing[0]
            raise DataError(f"{where}: data.columns.{f} names the field {columns[f]!r}, which this row lacks "
                            f"(keys: {', '.join(map(str, row)) or 'none'}); fix data.columns or the data")
        values = {f: row[theirs] for f, theirs in columns.items()}
        row = {k: v for k, v in row.items() if k not in columns.values()} | values
    if any(k in row for k in _SHAPES):
        return row
    if "instruction" in row and "output" in row:
        return _alpaca(row, where)
    if "conversations" in row:
        return {"messages": _sharegpt(row, where)}
    return row  # no known shape: the loader names the keys it expected


def _alpaca(row: dict, where: str) -> dict:
    inst, inp, out = row["instruction"], row.get("input") or "", row["output"]
    if not all(isinstance(v, str) for v in (inst, inp, out)):
        raise DataError(f"{where}: an Alpaca row's instruction, input and output must be strings")
    return {"prompt": inst + ("\n\n" + inp if inp else ""), "completion": out} | (
        {"system": row["system"]} if "system" in row else {})


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: conversations must be a list of {{\"from\", \"value\"}} turns (ShareGPT), "
                        f"got {type(turns).__name__}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: conversations[{i}] must be an object with \"from\" and \"value\" (ShareGPT)")
        if t["from"] not in _ROLES:
            raise DataError(f"{where}: conversations[{i}] is from {t['from']!r}, which is not a ShareGPT role "
                            f"megastream knows ({', '.join(_ROLES)}); rename it in the data")
        messages.append({"role": _ROLES[t["from"]], "content": t["value"]})
    if isinstance(row.get("system"), str) and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages
