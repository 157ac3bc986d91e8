"""Where records are kept (floe.data.readers): Parquet, Arrow, a datasets save_to_disk directory and
data.hf_dataset (a local dataset directory: no network) build the same rows as the JSONL file of the
same records; unreadable files are errors naming the file."""
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.data import DataConfig, build_dataset
from floe.data.formats import read_files

RECORDS = [{"conversations": [{"from": "human", "value": f"What is {i} + {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
           for i in range(12)]


def rows_of(tmp_path, **data):
    cfg = DataConfig(name="jsonl", seq_len=64, cache_dir=str(tmp_path / "cache"), **data)
    return build_dataset(cfg, 0)[1]


def same_rows(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("tokens", "trained", "position", "lengths"))


@pytest.fixture()
def stores(tmp_path):
    """The same ShareGPT records as JSONL, Parquet, Arrow (IPC stream), and a datasets dir."""
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    table = pa.Table.from_pylist(RECORDS)
    pq.write_table(table, tmp_path / "chats.parquet", row_group_size=5)  # several row groups
    with pa.ipc.new_stream(tmp_path / "chats.arrow", table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "hub").mkdir()
    pq.write_table(table, tmp_path / "hub" / "train.parquet")
    return tmp_path


def test_every_store_builds_the_jsonl_rows(stores):
    want = rows_of(stores, paths=[str(stores / "chats.jsonl")])
    assert want.stats["examples"] == len(RECORDS) and want.stats["skipped"] == {}
    for entry in ("chats.parquet", "chats.arrow", "saved", "saved_dict"):
        got = rows_of(stores, paths=[str(stores / entry)])
        assert same_rows(got, want), entry
    hub = rows_of(stores, hf_dataset=str(stores / "hub"))
    assert same_rows(hub, want) and hub.source_names == [f"hf:{stores / 'hub'}"]
    both = rows_of(stores, paths=[str(stores / "chats.parquet")], hf_dataset=str(stores / "hub"), weights=[1.0, 1.0])
    assert both.stats["examples"] == 2 * len(RECORDS) and len(both.source_names) == 2


def test_cache_key_follows_the_content_of_a_parquet_file_and_a_datasets_dir(stores):
    first = rows_of(stores, paths=[str(stores / "chats.parquet")])
    assert rows_of(stores, paths=[str(stores / "chats.parquet")]).cache_hit
    pq.write_table(pa.Table.from_pylist(RECORDS[:6]), stores / "chats.parquet")
    again = rows_of(stores, paths=[str(stores / "chats.parquet")])
    assert not again.cache_hit and again.stats["examples"] == 6 and again.fingerprint != first.fingerprint
    assert rows_of(stores, paths=[str(stores / "saved")]).stats["examples"] == len(RECORDS)
    datasets.Dataset.from_list(RECORDS[:3]).save_to_disk(str(stores / "saved2"))
    assert rows_of(stores, paths=[str(stores / "saved2")]).stats["examples"] == 3


def test_bad_stores_name_the_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken.parquet: not a readable Parquet file"):
        rows_of(tmp_path, paths=[str(tmp_path / "broken.parquet")])
    (tmp_path / "arr.json").write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(ValueError, match=r"arr.json:2: starts with '\[' but is not one JSON array"):
        rows_of(tmp_path, paths=[str(tmp_path / "arr.json")])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"data.paths\[0\]: .*plain is a directory but not a datasets save_to_disk"):
        rows_of(tmp_path, paths=[str(tmp_path / "plain")])
    (tmp_path / "nulls.json").write_text('[{"text": "a"}, null]')
    read = read_files([str(tmp_path / "nulls.json")], strict=False)
    assert dict(read.skipped) == {"not a JSON object": 1} and read.first_skips[0].endswith("record 2: not a JSON "
                                                                                         "object: got null")
    for streaming in ("auto", False):
        with pytest.raises(ValueError, match=r"data.hf_dataset=.*nowhere: datasets.load_dataset(_builder)? failed"):
            rows_of(tmp_path, hf_dataset=str(tmp_path / "nowhere"), hf_streaming=streaming)
    with pytest.raises(ValueError, match=r"data.hf_streaming must be true, false or auto, got 'sometimes'"):
        DataConfig(name="jsonl", hf_dataset="x", hf_streaming="sometimes")
    with pytest.raises(ValueError, match=r"data.hf_stream_above_gb must be >= 0, got -1.0"):
        DataConfig(name="jsonl", hf_dataset="x", hf_stream_above_gb=-1)


def test_auto_streams_a_dataset_whose_card_declares_a_large_download(stores, monkeypatch):
    """data.hf_streaming=auto asks the dataset card (datasets.load_dataset_builder: its README's
    dataset_info) for the download size: over data.hf_stream_above_gb, streamed (the cache key is then the
    name), else downloaded; without sizes on the card, downloaded. The rows are the same either way."""
    from floe.data import readers

    hub = stores / "hub"
    card = ("---\ndataset_info:\n  splits:\n  - name: train\n    num_bytes: 4000\n    num_examples: 12\n"
            "  download_size: 3000000\n  dataset_size: 4000\n---\n")
    (hub / "README.md").write_text(card)
    streamed, read = [], readers.iter_hub
    monkeypatch.setattr(readers, "iter_hub", lambda *a: streamed.append(a[3]) or read(*a))
    want = rows_of(stores, paths=[str(stores / "chats.jsonl")])
    results = {}
    for above_gb, expect in ((0.001, True), (10.0, False)):  # 3 MB declared: over 1 MiB, under 10 GiB
        readers.hub_streams.cache_clear()
        results[expect] = rows_of(stores, hf_dataset=str(hub), hf_stream_above_gb=above_gb)
        assert streamed[-1] is expect and same_rows(results[expect], want)
    assert results[True].path != results[False].path  # the cache key: the name, or datasets' own fingerprint
    (hub / "README.md").unlink()
    readers.hub_streams.cache_clear()
    assert not readers.hub_streams(str(hub), None, "auto", 0.0)  # no size on the card: downloaded
    assert readers.hub_streams(str(hub), None, True, 10.0) and not readers.hub_streams(str(hub), None, False, 0.0)
