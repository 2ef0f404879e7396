"""Read back what an offline W&B run wrote to disk, for tests.

An offline run leaves ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``: its transaction log.
This module parses that file itself (it does not use wandb's own reader) and summarises it.

File format (checked against wandb 0.31, whose Go core writes the file):

* A 7-byte header: ``b":W&B"``, uint16 ``0xBEE1`` little-endian, uint8 version (0).
* Then the LevelDB log format: the file is cut into 32 KiB blocks counted from the start of the
  file (the 7-byte header sits inside block 0). Each block holds tightly packed chunks, each with a
  7-byte header: uint32 checksum, uint16 payload length, uint8 chunk type (1 full, 2 first,
  3 middle, 4 last), all little-endian, then the payload. A chunk never crosses a block boundary;
  fewer than 7 bytes left at the end of a block are zero padding. A record too long for the rest
  of its block is split into a first chunk, middle chunks and a last chunk. The last block is not
  padded.
* The checksum is the plain (IEEE, ``zlib.crc32``) CRC-32 of the type byte followed by the
  payload, unmasked: not LevelDB's masked CRC-32C.
* Each record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

How wandb 0.31 stores what a test usually checks:

* ``run.log`` becomes a ``history`` record per step. Nested dicts are flattened: every leaf is its
  own item whose ``nested_key`` is the path (``{"a": {"b": 1}}`` -> ``["a", "b"]``), and media
  objects are flattened the same way, so a ``wandb.Histogram`` logged under ``h`` arrives as the
  items ``h/_type`` (``"histogram"``), ``h/values`` and ``h/bins``. A row is written only when
  its step is complete (the next step is logged, or the run finishes), so records may come out of
  call order. A literal ``"val/acc"`` key is the single ``nested_key`` ``["val/acc"]``, so it and
  ``{"val": {"acc": x}}`` both read back as ``"val/acc"`` here.
* A ``wandb.Table`` is written as JSON (``{"columns": [...], "data": [...]}``) to
  ``files/media/table/<key>_<n>_<sha256[:20]>.table.json`` (``n`` is wandb's step counter, which
  can trail an explicit ``step=``; read the path from the record). The history carries
  ``<key>/_type`` = ``"table-file"``, ``<key>/path`` (relative to ``files/``), ``sha256``,
  ``size``, ``ncols``, ``nrows``, ``log_mode`` and artifact paths; a ``files`` record names the
  file and an ``artifact`` record stages the run-table artifact.
* ``wandb.init(config=...)`` travels inside the ``run`` record; later ``run.config`` changes are
  ``config`` records. Values are whole JSON documents (a dict stays one value).
* The summary is a series of ``summary`` records (updates and removals), flattened like history
  for logged values; a value set through ``run.summary[k] = {...}`` stays one JSON value, and a
  key with ``define_metric(k, summary="min")`` holds ``{"min": ...}`` instead of the last value.
* ``run.alert`` is an ``alert`` record (title, text, level as a string such as ``"WARN"``, and
  ``wait_duration`` in milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
SUPPORTED_VERSIONS = frozenset({0})
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_CHUNK_NAMES = {FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}


class WandbFileError(ValueError):
    """A ``.wandb`` file that does not parse; ``offset`` is the byte where the problem is."""

    def __init__(self, path: str | Path, offset: int, message: str) -> None:
        super().__init__(f"{path}: offset {offset}: {message}")
        self.path = Path(path)
        self.offset = offset


def chunk_crc(chunk_type: int, payload: bytes) -> int:
    """The checksum wandb stores in a chunk header: CRC-32 (IEEE) of type byte + payload."""
    return zlib.crc32(payload, zlib.crc32(bytes((chunk_type,))))


def find_run_files(root: str | Path) -> list[Path]:
    """Every run's ``.wandb`` file under ``root``, oldest run first.

    ``root`` may be the ``dir=`` given to ``wandb.init`` (or a logger's ``save_dir``), its
    ``wandb/`` folder, or a run folder itself.
    """
    root = Path(root)
    found: set[Path] = set()
    for pattern in ("wandb/*run-*/run-*.wandb", "*run-*/run-*.wandb", "run-*.wandb"):
        found.update(p for p in root.glob(pattern) if p.is_file())
    # Run folders are named (offline-)run-<YYYYmmdd_HHMMSS>-<id>: sort on the time stamp.
    return sorted(found, key=lambda p: (p.parent.name.removeprefix("offline-"), p.name))


def iter_chunks(data: bytes, path: str | Path = "<bytes>") -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(offset, chunk_type, payload)`` for every chunk, checking header, CRCs, blocks."""
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(path, 0, f"file too short for the header ({len(data)} bytes)")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(path, 0, f"not a W&B file (header {data[:7]!r})")
    if version not in SUPPORTED_VERSIONS:
        raise WandbFileError(path, 6, f"unsupported W&B file version {version}")

    offset = FILE_HEADER.size
    end = len(data)
    while offset < end:
        block_end = (offset // BLOCK_SIZE + 1) * BLOCK_SIZE
        if block_end - offset < CHUNK_HEADER.size:
            # Trailer: too small for a chunk header; must be zero padding.
            trailer = data[offset : min(block_end, end)]
            if trailer.strip(b"\0"):
                raise WandbFileError(path, offset, "non-zero bytes in block trailer")
            offset = block_end
            continue
        if offset + CHUNK_HEADER.size > end:
            raise WandbFileError(path, offset, "truncated chunk header")
        crc, length, chunk_type = CHUNK_HEADER.unpack_from(data, offset)
        if crc == 0 and length == 0 and chunk_type == 0:
            # LevelDB readers skip a zeroed rest of block (preallocated or mmapped files).
            rest = data[offset : min(block_end, end)]
            if rest.strip(b"\0"):
                raise WandbFileError(path, offset, "zero chunk header followed by data")
            offset = block_end
            continue
        start = offset + CHUNK_HEADER.size
        stop = start + length
        if stop > block_end:
            raise WandbFileError(
                path, offset, f"chunk of {length} bytes crosses the block boundary at {block_end}"
            )
        if stop > end:
            raise WandbFileError(path, offset, f"truncated chunk ({end - start} of {length} bytes)")
        if chunk_type not in _CHUNK_NAMES:
            raise WandbFileError(path, offset, f"unknown chunk type {chunk_type}")
        payload = data[start:stop]
        actual = chunk_crc(chunk_type, payload)
        if actual != crc:
            raise WandbFileError(
                path, offset, f"checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"
            )
        yield offset, chunk_type, payload
        offset = stop


def iter_records(path: str | Path) -> Iterator[tuple[int, pb.Record]]:
    """Yield ``(offset of the record's first chunk, Record)`` for every record in the file."""
    data = Path(path).read_bytes()
    pending: bytearray | None = None
    pending_offset = -1
    for offset, chunk_type, payload in iter_chunks(data, path):
        if chunk_type in (FULL, FIRST):
            if pending is not None:
                raise WandbFileError(
                    path,
                    offset,
                    f"{_CHUNK_NAMES[chunk_type]} chunk inside the record that "
                    f"starts at {pending_offset}",
                )
            if chunk_type == FIRST:
                pending, pending_offset = bytearray(payload), offset
                continue
            record_offset, raw = offset, payload
        else:
            if pending is None:
                raise WandbFileError(
                    path, offset, f"{_CHUNK_NAMES[chunk_type]} chunk outside a record"
                )
            pending += payload
            if chunk_type == MIDDLE:
                continue
            record_offset, raw, pending = pending_offset, bytes(pending), None
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError as exc:
            raise WandbFileError(path, record_offset, f"record does not decode: {exc}") from exc
        yield record_offset, record
    if pending is not None:
        raise WandbFileError(path, pending_offset, "file ends inside a multi-chunk record")


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in file order; raises ``WandbFileError`` if corrupt."""
    return [record for _, record in iter_records(path)]


def item_key(item: Any) -> str:
    """The key of a history/summary/config item: ``key``, or ``nested_key`` joined by ``/``."""
    return "/".join(item.nested_key) if item.nested_key else item.key


def parse_value_json(text: str) -> Any:
    """Decode a ``value_json``; accepts the ``NaN``/``Infinity`` tokens wandb writes."""
    return json.loads(text)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}`` (a leaf wins over a subtree)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return out


def group(flat: dict[str, Any], key: str) -> Any:
    """The value logged under ``key``, rebuilding a dict/media object flattened into ``key/...``.

    Raises ``KeyError`` when neither ``key`` nor any ``key/...`` is present.
    """
    if key in flat:
        return flat[key]
    prefix = key + "/"
    sub = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(key)
    return unflatten(sub)


@dataclass(frozen=True)
class HistogramData:
    bins: list[float]
    values: list[float]


@dataclass(frozen=True)
class TableData:
    columns: list[str]
    rows: list[list[Any]]
    path: Path


@dataclass
class RunData:
    """What a run wrote, rebuilt from its records. Keys are ``/``-joined item paths."""

    path: Path
    records: list[pb.Record]
    run_id: str = ""
    project: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> RunData:
        path = Path(path)
        data = cls(path=path, records=read_records(path))
        for record in data.records:
            data._apply(record)
        return data

    def _apply(self, record: pb.Record) -> None:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            self.run_id = record.run.run_id
            self.project = record.run.project
            self._apply_config(record.run.config)
        elif kind == "config":
            self._apply_config(record.config)
        elif kind == "history":
            row = {item_key(i): parse_value_json(i.value_json) for i in record.history.item}
            self.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                self.summary[item_key(item)] = parse_value_json(item.value_json)
            for item in record.summary.remove:
                self._remove(self.summary, item_key(item))
        elif kind == "alert":
            a = record.alert
            self.alerts.append(
                {
                    "title": a.title,
                    "text": a.text,
                    "level": a.level,
                    "wait_duration": a.wait_duration,
                }
            )
        elif kind == "files":
            for f in record.files.files:
                self.files.append(
                    {
                        "path": f.path,
                        "type": pb.FilesItem.FileType.Name(f.type),
                        "policy": pb.FilesItem.PolicyType.Name(f.policy),
                    }
                )
        elif kind == "metric":
            m = record.metric
            self.metrics.append(
                {
                    "name": m.name,
                    "glob_name": m.glob_name,
                    "step_metric": m.step_metric,
                    "summary": sorted(f.name for f, v in m.summary.ListFields() if v),
                    "hidden": m.options.hidden,
                }
            )
        elif kind == "exit":
            self.exit_code = record.exit.exit_code

    def _apply_config(self, config: pb.ConfigRecord) -> None:
        for item in config.update:
            self.config[item_key(item)] = parse_value_json(item.value_json)
        for item in config.remove:
            self._remove(self.config, item_key(item))

    @staticmethod
    def _remove(flat: dict[str, Any], key: str) -> None:
        for k in [k for k in flat if k == key or k.startswith(key + "/")]:
            del flat[k]

    # ---- convenience -------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def files_dir(self) -> Path:
        return self.run_dir / "files"

    @property
    def user_config(self) -> dict[str, Any]:
        """The config without wandb's own ``_wandb`` entry."""
        return {k: v for k, v in self.config.items() if k != "_wandb"}

    @property
    def user_summary(self) -> dict[str, Any]:
        """The summary without ``_wandb/...``, ``_runtime``, ``_timestamp`` and ``_step``."""
        return {
            k: v
            for k, v in self.summary.items()
            if k.split("/")[0] not in ("_wandb", "_runtime", "_timestamp", "_step")
        }

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """History rows that logged ``key`` (or something flattened under ``key/``)."""
        prefix = key + "/"
        return [r for r in self.history if key in r or any(k.startswith(prefix) for k in r)]

    def series(self, key: str, step_key: str = "_step") -> list[tuple[Any, Any]]:
        """``[(row[step_key], value of key), ...]`` over the rows that logged ``key``."""
        return [(row.get(step_key), group(row, key)) for row in self.rows_with(key)]

    def row_at(self, step: int) -> dict[str, Any]:
        """The history row whose ``_step`` is ``step``."""
        rows = [r for r in self.history if r.get("_step") == step]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} history rows have _step == {step}")
        return rows[0]

    def value(self, key: str, step: int | None = None) -> Any:
        """``key``'s value at ``step`` (default: its last logged value), regrouped."""
        if step is not None:
            return group(self.row_at(step), key)
        rows = self.rows_with(key)
        if not rows:
            raise KeyError(key)
        return group(rows[-1], key)

    def histogram(self, key: str, step: int | None = None) -> HistogramData:
        """A ``wandb.Histogram`` logged under ``key``: its bin edges and counts."""
        obj = self.value(key, step)
        if not isinstance(obj, dict) or obj.get("_type") != "histogram":
            raise TypeError(f"{key!r} is not a histogram: {obj!r}")
        bins, values = list(obj["bins"]), list(obj["values"])
        if len(bins) != len(values) + 1:
            raise ValueError(f"{key!r}: {len(bins)} bin edges for {len(values)} values")
        return HistogramData(bins=bins, values=values)

    def table(self, key: str, step: int | None = None) -> TableData:
        """A ``wandb.Table`` logged under ``key``, loaded from its JSON file in ``files/``."""
        obj = self.value(key, step)
        return self.load_table(obj, key)

    def load_table(self, obj: Any, key: str = "<table>") -> TableData:
        """Load the table a ``{"_type": "table-file", "path": ...}`` value points to."""
        if not isinstance(obj, dict) or obj.get("_type") != "table-file":
            raise TypeError(f"{key!r} is not a table-file: {obj!r}")
        file = self.files_dir / obj["path"]
        raw = file.read_bytes()
        if "sha256" in obj and hashlib.sha256(raw).hexdigest() != obj["sha256"]:
            raise ValueError(f"{file}: sha256 does not match the logged {obj['sha256']}")
        if "size" in obj and len(raw) != obj["size"]:
            raise ValueError(f"{file}: {len(raw)} bytes, the log says {obj['size']}")
        content = json.loads(raw)
        table = TableData(columns=list(content["columns"]), rows=content["data"], path=file)
        if "ncols" in obj and obj["ncols"] != len(table.columns):
            raise ValueError(f"{file}: {len(table.columns)} columns, the log says {obj['ncols']}")
        if "nrows" in obj and obj["nrows"] != len(table.rows):
            raise ValueError(f"{file}: {len(table.rows)} rows, the log says {obj['nrows']}")
        return table

    def records_of(self, kind: str) -> list[pb.Record]:
        """Records whose ``record_type`` is ``kind`` (``"history"``, ``"alert"``...)."""
        return [r for r in self.records if r.WhichOneof("record_type") == kind]


def load_run(path: str | Path, wait_s: float = 30.0) -> RunData:
    """Read a run from its ``.wandb`` file, or from a folder holding exactly one run.

    wandb's writer process may still be flushing the file's last block after
    ``run.finish()`` returns: a file that ends inside a record is read again, for
    up to ``wait_s`` seconds, before the error is raised. Any other corruption
    raises at once.
    """
    import time

    path = Path(path)
    if path.is_dir():
        runs = find_run_files(path)
        if len(runs) != 1:
            raise FileNotFoundError(f"expected one .wandb file under {path}, found {runs}")
        path = runs[0]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = RunData.from_file(path)
        except WandbFileError as error:
            if "file ends inside" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)  # the exit record is the last one wandb writes
