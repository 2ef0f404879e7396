"""``wandb_reader`` against real offline runs written by the installed wandb (and Lightning)."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wandb
import wandb_reader as wr
from wandb.proto import wandb_internal_pb2 as pb

CONFIG = {"lr": 0.01, "optimizer": {"name": "sgd", "momentum": 0.9}, "layers": [4, 8]}
LOSSES = {0: 2.5, 1: 1.25, 2: 0.1, 5: 1 / 3}  # step -> train/loss
GRAD_NORMS = {0: 10.0, 1: 2.718281828459045, 2: 1e-7, 5: 0.0}
HIST_STEP, HIST_COUNTS, HIST_EDGES = 6, [1, 0, 3, 2], [-1.0, -0.5, 0.0, 0.5, 1.0]
TABLE_STEP, TABLE_COLUMNS = 7, ["layer", "norm", "dead"]
TABLE_ROWS = [["fc1", 0.5, False], ["fc2", 1.75, True]]
BLOB_STEP, BLOB = 8, "".join(str(i) for i in range(20000))  # ~89 KB: spans several blocks
ALERT = {"title": "Exploding gradients", "text": "fc1 norm 1e4 > 1e3", "level": "WARN"}


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Offline, silent wandb whose every folder (config, cache, staging) is a temp folder."""
    root = tmp_path_factory.mktemp("wandb_env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / var.lower()))
        yield root


@pytest.fixture(scope="module")
def run_dir(wandb_env: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real offline run logging scalars, a histogram, a table, an alert and a summary."""
    out = tmp_path_factory.mktemp("plain_run")
    run = wandb.init(mode="offline", dir=out, project="gradguard-tests", config=CONFIG)
    run_id = run.id
    try:
        run.config.update({"epochs": 3})
        run.define_metric("train/loss", summary="min")
        for step, loss in LOSSES.items():
            run.log({"train/loss": loss, "grad": {"norm": GRAD_NORMS[step]}}, step=step)
        hist = wandb.Histogram(np_histogram=(np.array(HIST_COUNTS), np.array(HIST_EDGES)))
        run.log({"weights": hist}, step=HIST_STEP)
        run.log({"layers": wandb.Table(columns=TABLE_COLUMNS, data=TABLE_ROWS)}, step=TABLE_STEP)
        run.log({"blob": BLOB}, step=BLOB_STEP)
        run.alert(
            title=ALERT["title"], text=ALERT["text"], level=wandb.AlertLevel.WARN, wait_duration=90
        )
        run.summary["best_loss"] = 0.1
        run.summary["final"] = {"acc": 0.875}
    finally:
        run.finish()
    wr.load_run(out)  # wait until the writer has flushed the file
    wandb.teardown()  # the process-wide wandb settings must not leak into other tests
    return out, run_id


@pytest.fixture(scope="module")
def run(run_dir: tuple[Path, str]) -> wr.RunData:
    return wr.load_run(run_dir[0])


# ---- file layout and the parser ----------------------------------------------------------------


def test_find_run_files(run_dir: tuple[Path, str]) -> None:
    out, run_id = run_dir
    files = wr.find_run_files(out)
    assert len(files) == 1
    assert files[0].name == f"run-{run_id}.wandb"
    assert files[0].parent.name.startswith("offline-run-")
    assert files[0].parent.parent == out / "wandb"
    # The wandb/ folder and the run folder work as roots too.
    assert wr.find_run_files(out / "wandb") == files
    assert wr.find_run_files(files[0].parent) == files
    assert wr.find_run_files(out / "nowhere") == []


def test_header_and_crc_kind(run: wr.RunData) -> None:
    data = run.path.read_bytes()
    assert data[:4] == b":W&B"
    assert struct.unpack_from("<HB", data, 4) == (0xBEE1, 0)
    # The first chunk's checksum is plain CRC-32 (zlib) of type byte + payload, unmasked.
    crc, length, chunk_type = struct.unpack_from("<IHB", data, 7)
    assert chunk_type == wr.FULL
    assert crc == zlib.crc32(data[13 : 14 + length])
    assert crc == wr.chunk_crc(chunk_type, data[14 : 14 + length])


def test_records(run: wr.RunData, run_dir: tuple[Path, str]) -> None:
    kinds = [r.WhichOneof("record_type") for r in run.records]
    assert kinds[0] == "header"
    assert kinds[-1] == "exit"
    assert run.exit_code == 0
    assert [r.num for r in run.records] == list(range(1, len(run.records) + 1))
    assert run.run_id == run_dir[1]
    assert run.project == "gradguard-tests"
    assert run.records[0].header.version_info.producer.startswith(wandb.__version__)


def test_multi_chunk_record_across_blocks(run: wr.RunData) -> None:
    """The ~89 KB blob row is split FIRST/MIDDLE.../LAST on 32 KiB block boundaries."""
    chunks = list(wr.iter_chunks(run.path.read_bytes()))
    types = [t for _, t, _ in chunks]
    assert wr.MIDDLE in types
    for offset, chunk_type, payload in chunks:
        assert offset // wr.BLOCK_SIZE == (offset + 6 + len(payload)) // wr.BLOCK_SIZE
        if chunk_type in (wr.MIDDLE, wr.LAST):
            assert offset % wr.BLOCK_SIZE == 0
    assert run.value("blob") == BLOB
    assert run.row_at(BLOB_STEP)["blob"] == BLOB


# ---- what the run logged -----------------------------------------------------------------------


def test_scalar_history(run: wr.RunData) -> None:
    assert run.series("train/loss") == list(LOSSES.items())
    # A nested dict is flattened into the "grad/norm" item.
    assert run.series("grad/norm") == list(GRAD_NORMS.items())
    assert run.series("grad") == [(s, {"norm": v}) for s, v in GRAD_NORMS.items()]
    for step in LOSSES:
        row = run.row_at(step)
        assert set(row) == {"train/loss", "grad/norm", "_step", "_runtime", "_timestamp"}
    assert [row["_step"] for row in run.history] == [*LOSSES, HIST_STEP, TABLE_STEP, BLOB_STEP]
    # The history record's own step field agrees with the _step item.
    assert [r.history.step.num for r in run.records_of("history")] == [
        row["_step"] for row in run.history
    ]


def test_histogram(run: wr.RunData) -> None:
    hist = run.histogram("weights")
    assert hist == wr.HistogramData(bins=HIST_EDGES, values=HIST_COUNTS)
    assert run.histogram("weights", step=HIST_STEP) == hist
    # Stored flattened: one history item per field.
    row = run.row_at(HIST_STEP)
    assert row["weights/_type"] == "histogram"
    assert row["weights/bins"] == HIST_EDGES
    assert row["weights/values"] == HIST_COUNTS
    with pytest.raises(TypeError, match="not a histogram"):
        run.histogram("train/loss")
    with pytest.raises(KeyError):
        run.histogram("missing")


def test_table(run: wr.RunData) -> None:
    table = run.table("layers", step=TABLE_STEP)
    assert table.columns == TABLE_COLUMNS
    assert table.rows == TABLE_ROWS
    assert table.path.is_file()
    assert table.path.parent == run.files_dir / "media" / "table"
    assert table.path.name.startswith("layers_") and table.path.name.endswith(".table.json")
    ref = run.value("layers")
    assert ref["_type"] == "table-file"
    assert (ref["ncols"], ref["nrows"]) == (3, 2)
    assert ref["path"] == table.path.relative_to(run.files_dir).as_posix()
    # The table file is announced in a files record.
    assert ref["path"] in [f["path"] for f in run.files]


def test_alert(run: wr.RunData) -> None:
    assert run.alerts == [{**ALERT, "wait_duration": 90_000}]  # milliseconds


def test_config(run: wr.RunData) -> None:
    assert run.user_config == {**CONFIG, "epochs": 3}
    assert "_wandb" in run.config
    # init's config rides in the run record; the later update is a config record.
    assert len(run.records_of("config")) >= 1


def test_summary_and_metrics(run: wr.RunData) -> None:
    summary = run.user_summary
    assert summary["best_loss"] == 0.1
    assert summary["final"] == {"acc": 0.875}  # set through run.summary: one JSON value
    assert summary["train/loss"] == {"min": min(LOSSES.values())}  # define_metric(summary=min)
    assert summary["grad/norm"] == GRAD_NORMS[5]
    assert summary["blob"] == BLOB
    assert summary["weights/bins"] == HIST_EDGES
    assert run.summary["_step"] == BLOB_STEP
    assert [m["summary"] for m in run.metrics if m["name"] == "train/loss"] == [["min"]]


# ---- corruption --------------------------------------------------------------------------------


def _corrupt(src: Path, dst: Path, offset: int, data: bytes | None = None) -> Path:
    raw = bytearray(src.read_bytes())
    if data is None:
        raw[offset] ^= 0x01
    else:
        raw[offset : offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def test_corrupt_payload_byte_raises_with_offset(run: wr.RunData, tmp_path: Path) -> None:
    chunks = list(wr.iter_chunks(run.path.read_bytes()))
    for offset, _, payload in (chunks[3], chunks[-1], *(c for c in chunks if c[1] == wr.MIDDLE)):
        bad = _corrupt(run.path, tmp_path / "bad.wandb", offset + 7 + len(payload) // 2)
        with pytest.raises(wr.WandbFileError, match="checksum mismatch") as info:
            wr.read_records(bad)
        assert info.value.offset == offset
        assert f"offset {offset}:" in str(info.value)


def test_corrupt_header_length_and_tail_raise(run: wr.RunData, tmp_path: Path) -> None:
    with pytest.raises(wr.WandbFileError, match="not a W&B file") as info:
        wr.read_records(_corrupt(run.path, tmp_path / "magic.wandb", 1))
    assert info.value.offset == 0
    with pytest.raises(wr.WandbFileError, match="unsupported W&B file version"):
        wr.read_records(_corrupt(run.path, tmp_path / "version.wandb", 6, b"\x07"))
    # A flipped bit in the first chunk's crc.
    with pytest.raises(wr.WandbFileError, match="checksum mismatch") as info:
        wr.read_records(_corrupt(run.path, tmp_path / "crc.wandb", 7))
    assert info.value.offset == 7
    # A chunk type that does not exist.
    with pytest.raises(wr.WandbFileError, match="unknown chunk type") as info:
        wr.read_records(_corrupt(run.path, tmp_path / "type.wandb", 13, b"\x09"))
    assert info.value.offset == 7
    # A length that runs past the block.
    with pytest.raises(wr.WandbFileError, match="crosses the block boundary"):
        wr.read_records(_corrupt(run.path, tmp_path / "len.wandb", 11, b"\xff\xff"))
    # A file cut inside the last chunk, and inside a multi-chunk record.
    data = run.path.read_bytes()
    (tmp_path / "cut.wandb").write_bytes(data[:-3])
    with pytest.raises(wr.WandbFileError, match="truncated chunk"):
        wr.read_records(tmp_path / "cut.wandb")
    first = next(off for off, t, _ in wr.iter_chunks(data) if t == wr.FIRST)
    (tmp_path / "cut2.wandb").write_bytes(data[: (first // wr.BLOCK_SIZE + 1) * wr.BLOCK_SIZE])
    with pytest.raises(wr.WandbFileError, match="ends inside a multi-chunk record") as info:
        wr.read_records(tmp_path / "cut2.wandb")
    assert info.value.offset == first
    # Untouched copy still reads.
    shutil.copy(run.path, tmp_path / "ok.wandb")
    assert len(wr.read_records(tmp_path / "ok.wandb")) == len(run.records)


# ---- block edges, with a writer that follows wandb's Go writer ---------------------------------


def _write_log(records: list[pb.Record]) -> bytes:
    out = bytearray(wr.FILE_HEADER.pack(wr.FILE_IDENT, wr.FILE_MAGIC, 0))
    for record in records:
        rest, first = record.SerializeToString(), True
        while True:
            left = wr.BLOCK_SIZE - len(out) % wr.BLOCK_SIZE
            if left < wr.CHUNK_HEADER.size:
                out += b"\0" * left
                continue
            n = min(len(rest), left - wr.CHUNK_HEADER.size)
            chunk, rest = rest[:n], rest[n:]
            last = not rest
            kind = (wr.FULL if last else wr.FIRST) if first else (wr.LAST if last else wr.MIDDLE)
            out += wr.CHUNK_HEADER.pack(wr.chunk_crc(kind, chunk), n, kind) + chunk
            first = False
            if last:
                break
    return bytes(out)


def _record_of_size(num: int, size: int) -> pb.Record:
    for pad in range(size, -1, -1):
        record = pb.Record(num=num, output_raw=pb.OutputRawRecord(line="x" * pad))
        if record.ByteSize() == size:
            return record
    raise AssertionError(size)


@pytest.mark.parametrize("left", [0, 1, 6, 7, 8])
def test_block_edges(left: int, tmp_path: Path) -> None:
    """``left`` bytes remain in block 0 after the first record: padding, or a 0-byte FIRST."""
    size = wr.BLOCK_SIZE - wr.FILE_HEADER.size - wr.CHUNK_HEADER.size - left
    records = [_record_of_size(1, size), _record_of_size(2, 40), _record_of_size(3, 70000)]
    path = tmp_path / "edge.wandb"
    path.write_bytes(_write_log(records))
    assert wr.read_records(path) == records
    second = list(wr.iter_chunks(path.read_bytes()))[1]
    if left < 7:
        assert second[0] == wr.BLOCK_SIZE  # skipped the padding
    elif left == 7:
        assert second[:3] == (wr.BLOCK_SIZE - 7, wr.FIRST, b"")  # empty FIRST fills the block
    if 0 < left < 7:
        bad = _corrupt(path, tmp_path / "trailer.wandb", wr.BLOCK_SIZE - 1, b"\x01")
        with pytest.raises(wr.WandbFileError, match="trailer") as info:
            wr.read_records(bad)
        assert info.value.offset == wr.BLOCK_SIZE - left


def test_helpers_on_flat_dicts() -> None:
    assert wr.unflatten({"a/b": 1, "a/c/d": 2, "e": 3}) == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert wr.group({"h/_type": "histogram", "h/bins": [0, 1]}, "h") == {
        "_type": "histogram",
        "bins": [0, 1],
    }
    assert wr.group({"x": 1, "x2": 2}, "x") == 1
    with pytest.raises(KeyError):
        wr.group({"x2": 2}, "x")


# ---- Lightning's WandbLogger -------------------------------------------------------------------


def test_lightning_wandb_logger(wandb_env: Path, tmp_path: Path) -> None:
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=tmp_path, project="gradguard-pl")
    logged: list[tuple[dict[str, Any], int | None]] = [
        ({"train/loss": 0.5, "grad_norm/fc1": 3.25}, 3),
        ({"val/acc": 0.75}, 3),
        ({"train/loss": 0.25, "grad_norm/fc1": 1.5}, 10),
        ({"no_step": 1.0}, None),
    ]
    try:
        logger.log_hyperparams({"lr": 0.1, "net": {"width": 4}})
        for metrics, step in logged:
            logger.log_metrics(metrics, step=step)
        run_id = logger.experiment.id
    finally:
        logger.experiment.finish()

    run = wr.load_run(tmp_path)
    wandb.teardown()
    assert run.run_id == run_id
    assert run.path.parent.parent == tmp_path / "wandb"
    assert run.user_config == {"lr": 0.1, "net": {"width": 4}}
    # One history row per log_metrics call, each with trainer/global_step = the step passed.
    assert len(run.history) == len(logged)
    for row, (metrics, step) in zip(run.history, logged):
        assert {k: row[k] for k in metrics} == metrics
        if step is not None:
            assert row["trainer/global_step"] == step
    # Without a step, define_metric(step_sync=True) fills in the last global step.
    assert run.history[-1]["trainer/global_step"] == 10
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3]
    assert run.series("train/loss", step_key="trainer/global_step") == [(3, 0.5), (10, 0.25)]
    assert run.series("grad_norm/fc1", step_key="trainer/global_step") == [(3, 3.25), (10, 1.5)]
    metric_defs = {(m["name"], m["glob_name"], m["step_metric"]) for m in run.metrics}
    assert ("trainer/global_step", "", "") in metric_defs
    assert ("", "*", "trainer/global_step") in metric_defs
    assert run.user_summary["trainer/global_step"] == 10
    assert run.user_summary["train/loss"] == 0.25
