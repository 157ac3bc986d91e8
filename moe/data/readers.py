"""Where records are kept: one `data.paths` entry (or data.hf_dataset) -> (position, record) pairs, streamed.

    *.jsonl                     one JSON value per line (floe.data.formats.iter_jsonl); position = line
    other names                 one JSON array of records when the file starts with "[" (alpaca_data.json;
                                position = record number), else JSONL
    *.parquet                   row groups read in batches (pyarrow); position = row number
    *.arrow                     Arrow IPC file or stream (what datasets' save_to_disk writes)
    a directory                 written by datasets' save_to_disk (a DatasetDict: its "train" split)
    data.hf_dataset=<name>      datasets.load_dataset(name, split=data.hf_split), memory-mapped from the
                                Hub cache, or streamed without a local copy: data.hf_streaming=auto
                                (the default) streams when the dataset card's download size exceeds
                                data.hf_stream_above_gb (hub_streams), true / false force it

Every reader yields plain dicts; floe.data.layouts reads them. Positions are 1-based.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

BATCH_ROWS = 1024  # rows per Arrow batch turned into Python records


def kind_of(path: str) -> str:
    """'dataset' (a save_to_disk directory), 'parquet', 'arrow', 'json_array' or 'jsonl'."""
    if os.path.isdir(path):
        return "dataset"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json_array" if head.startswith(b"[") else "jsonl"


def unit(kind: str) -> str:
    """What a position counts in a file of this kind (for 'path:line 3' / 'path: record 3')."""
    return "line" if kind == "jsonl" else "record"


def iter_json_array(path: str) -> Iterator[tuple[int, object]]:
    """Records of a file holding one JSON array; ValueError naming the file when it is not one."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: starts with '[' but is not one JSON array ({e.msg}); "
                             "a JSONL file has one record per line") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records")
    from floe.data.layouts import NOT_OBJECT, BadRecord

    for i, record in enumerate(data, start=1):  # a null is a bad record, not a blank line
        yield i, BadRecord(NOT_OBJECT, "got null") if record is None else record


def iter_arrow_table_batches(batches) -> Iterator[tuple[int, dict]]:
    n = 0
    for batch in batches:
        for record in batch.to_pylist():
            n += 1
            yield n, record


def iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    yield from iter_arrow_table_batches(pf.iter_batches(batch_size=BATCH_ROWS))


def iter_arrow(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not an Arrow IPC file or stream ({e})") from None
    yield from iter_arrow_table_batches(batches)


def _datasets():
    """The datasets library, its progress bars off unless stderr is a terminal (no carriage returns in logs)."""
    import sys

    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets


def iter_saved_dataset(path: str) -> Iterator[tuple[int, dict]]:
    """Rows of a datasets.save_to_disk directory (a DatasetDict gives its train split)."""
    datasets = _datasets()

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                             "give the split's directory instead")
        ds = ds["train"]
    # Arrow batches to Python, as for Parquet: 2.4x the rate of datasets' row-by-row formatting
    yield from iter_arrow_table_batches(ds.with_format("arrow").iter(batch_size=BATCH_ROWS))


def iter_file(path: str, kind: str, jsonl_iter) -> Iterator[tuple[int, object]]:
    """(position, record) of one data.paths file; `jsonl_iter` reads the JSONL kind (formats.iter_jsonl)."""
    readers = {"dataset": iter_saved_dataset, "parquet": iter_parquet, "arrow": iter_arrow,
               "json_array": iter_json_array, "jsonl": jsonl_iter}
    return readers[kind](path)


@functools.lru_cache(maxsize=None)
def hub_streams(name: str, config: str | None, setting: bool | str, above_gb: float) -> bool:
    """Whether data.hf_dataset is streamed: `setting` when true or false; for "auto", whether the
    download the dataset's card declares (datasets.load_dataset_builder(...).info.download_size, else
    dataset_size) is larger than `above_gb` GiB. A card without sizes: downloaded. Decided once per
    process (the reader and the cache key ask the same question)."""
    if setting != "auto":
        return bool(setting)
    datasets = _datasets()
    try:
        info = datasets.load_dataset_builder(name, config).info
    except Exception as e:  # as load_dataset: not found, no network, a bad config name
        raise ValueError(f"data.hf_dataset={name}: datasets.load_dataset_builder failed: {type(e).__name__}: {e}") \
            from None
    size = info.download_size or info.dataset_size
    streams = size is not None and size > above_gb * 2**30
    log.info("data.hf_dataset=%s: %s (%s; data.hf_streaming=auto, above %g GiB)", name,
             "streamed" if streams else "downloaded",
             "size not on its card" if size is None else f"{size / 2**30:.2f} GiB", above_gb)
    return streams


def iter_hub(name: str, split: str, config: str | None, streaming: bool) -> Iterator[tuple[int, dict]]:
    """Rows of a Hugging Face dataset (a Hub name or a local dataset directory), one split."""
    datasets = _datasets()

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError)
        raise ValueError(f"data.hf_dataset={name}: datasets.load_dataset failed: {type(e).__name__}: {e}") from None
    yield from enumerate(ds, start=1)


def hub_fingerprint(name: str, split: str, config: str | None, streaming: bool) -> str:
    """What identifies the Hub dataset's content for the cache key: datasets' own fingerprint of the
    loaded split, or (streamed: no local copy to hash) its name, config and split."""
    if streaming:
        return json.dumps([name, config, split])
    datasets = _datasets()

    try:
        return datasets.load_dataset(name, config, split=split)._fingerprint
    except Exception as e:
        raise ValueError(f"data.hf_dataset={name}: datasets.load_dataset failed: {type(e).__name__}: {e}") from None
