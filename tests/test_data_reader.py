"""PreparedDataset validation, token access across shards, packed windows, tokenizer checks, eval windows."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from continual_pt.data.dataset import PackedSequences, PreparedDataset, Setting, check_tokenizer, eval_windows
from continual_pt.errors import UserError
from tests.helpers import PYTHIA_TOKENIZER

PYTHIA = PYTHIA_TOKENIZER


@pytest.fixture
def data_copy(tmp_path, data_dataset) -> Path:
    """A private copy of the session dataset that a test may damage."""
    return Path(shutil.copytree(data_dataset, tmp_path / "ds"))


def all_tokens(path: Path, split: str = "train") -> np.ndarray:
    manifest = json.loads((path / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(path / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_attributes_and_tokens_across_shard_boundaries(data_dataset):
    ds = PreparedDataset(data_dataset)
    flat = all_tokens(data_dataset)
    assert ds.num_tokens == len(flat) and len(ds.shards) > 3 and ds.eos_id == 0
    assert ds.num_docs == int((flat == ds.eos_id).sum())
    assert ds.tokenizer_dir == data_dataset / "tokenizer" and len(ds.tokenizer_sha256) == 64
    for start, stop in [(0, 1), (4990, 5010), (4999, 15001), (0, ds.num_tokens), (ds.num_tokens, ds.num_tokens),
                        (10000, 10000)]:
        assert np.array_equal(ds.tokens(start, stop), flat[start:stop])
    with pytest.raises(IndexError):
        ds.tokens(0, ds.num_tokens + 1)
    val = PreparedDataset(data_dataset, "val")
    assert val.num_docs > 0 and np.array_equal(val.tokens(0, val.num_tokens), all_tokens(data_dataset, "val"))
    with pytest.raises(UserError, match="no split 'test'"):
        PreparedDataset(data_dataset, "test")
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive it pickled
    assert np.array_equal(clone.tokens(4999, 5001), flat[4999:5001])


def test_truncated_or_missing_shard(data_copy):
    shard = data_copy / "train" / "000001.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(UserError, match="truncated or corrupt shard") as info:
        PreparedDataset(data_copy)
    assert str(shard) in str(info.value)
    shard.unlink()
    with pytest.raises(UserError, match="000001.bin: shard missing"):
        PreparedDataset(data_copy)


def test_corrupt_shard_content(data_copy):
    ds = PreparedDataset(data_copy)
    packed = PackedSequences(ds, 31)
    shard = data_copy / "train" / "000002.bin"
    data = np.fromfile(shard, dtype="<u2")
    data[7] = 65000  # beyond the vocabulary, within the dtype
    data.tofile(shard)
    with pytest.raises(UserError, match="corrupt shard"):
        PreparedDataset(data_copy, verify=True)
    bad_window = (2 * 5000 + 7) // 32
    with pytest.raises(UserError, match="token id 65000 >= vocab_size") as info:
        PackedSequences(PreparedDataset(data_copy), 31)[bad_window]
    assert "000002.bin" in str(info.value)
    assert packed[0].dtype == np.int64


def test_manifest_problems(data_copy):
    edit_manifest(data_copy, lambda m: m.update(format_version=99))
    with pytest.raises(UserError, match="format_version 99 is not supported"):
        PreparedDataset(data_copy)
    edit_manifest(data_copy, lambda m: m.update(format_version=1, vocab_size=70000))
    with pytest.raises(UserError, match="vocab_size 70000 does not fit dtype uint16"):
        PreparedDataset(data_copy)
    edit_manifest(data_copy, lambda m: m.update(vocab_size=400, dtype="int8"))
    with pytest.raises(UserError, match="dtype 'int8' unknown"):
        PreparedDataset(data_copy)
    edit_manifest(data_copy, lambda m: (m.update(dtype="uint16"), m["splits"]["train"].update(num_tokens=5)))
    with pytest.raises(UserError, match="claims 5 tokens"):
        PreparedDataset(data_copy)
    (data_copy / "manifest.json").write_text('{"format_version": 1, "splits": ')
    with pytest.raises(UserError, match="corrupt manifest"):
        PreparedDataset(data_copy)
    (data_copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a complete prepared dataset"):
        PreparedDataset(data_copy)
    with pytest.raises(UserError, match="no prepared dataset here"):
        PreparedDataset(data_copy / "nope")


SETTING = Setting("run.yaml: data.train.down.path", "set data.train.down.path to that folder", "data/tok")


def not_a_dataset(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        PreparedDataset(path, setting=SETTING)
    return str(caught.value)


def test_raw_text_is_named_with_the_key_that_gave_it_and_how_to_prepare_it(tmp_path, data_copy):
    """A raw .jsonl file or a folder of raw files is no interrupted `cpt prepare`, nor a place for its --out."""
    raw = tmp_path / "down.jsonl"
    raw.write_text('{"text": "a"}\n')
    folder = tmp_path / "corpus"
    (folder / "tokenizer").mkdir(parents=True)    # a tokenizer beside raw files makes no dataset of them
    for name in ("a.jsonl", "b.jsonl", "part.txt"):
        shutil.copy(raw, folder / name)
    advice = ("not a prepared dataset; prepare it with `cpt prepare --source {} --out <a new folder> --tokenizer "
              "data/tok`, then set data.train.down.path to that folder")
    assert not_a_dataset(raw) == f"run.yaml: data.train.down.path: {raw} is raw text (a .jsonl file), " \
        + advice.format(raw)
    assert not_a_dataset(folder) == (f"run.yaml: data.train.down.path: {folder} is raw text (a folder holding "
                                     f"3 raw files: 2 *.jsonl, 1 *.txt), " + advice.format(folder))
    # Shards without a manifest are what an interrupted prepare leaves: they keep their own message.
    (data_copy / "manifest.json").unlink()
    shutil.copy(raw, data_copy / "notes.jsonl")
    assert not_a_dataset(data_copy) == (f"run.yaml: data.train.down.path: {data_copy}: not a complete prepared "
                                        "dataset (no manifest.json); an interrupted `cpt prepare` never writes one: "
                                        "run it again")
    (tmp_path / "empty").mkdir()
    assert "empty is a folder with no manifest.json, shards or raw text files in it" in not_a_dataset(tmp_path / "empty")


def test_manifest_with_a_missing_tokenizer_copy(data_copy):
    shutil.rmtree(data_copy / "tokenizer")
    with pytest.raises(UserError, match="tokenizer copy is missing"):
        PreparedDataset(data_copy)


def test_check_tokenizer(tmp_path, data_dataset, data_tokenizer, data_copy):
    ds = PreparedDataset(data_dataset)
    assert check_tokenizer({"a": ds, "b": PreparedDataset(data_dataset, "val")}, str(data_tokenizer)) == \
        ds.tokenizer_sha256
    assert check_tokenizer({"a": ds}, ds.tokenizer_sha256) == ds.tokenizer_sha256
    with pytest.raises(UserError, match="differs from the one") as info:
        check_tokenizer({"sp": ds}, str(PYTHIA))
    assert str(data_dataset) in str(info.value)
    edit_manifest(data_copy, lambda m: m["tokenizer"].update(sha256="0" * 64, name="other"))
    with pytest.raises(UserError, match="different tokenizers") as info:
        check_tokenizer({"sp": ds, "pile": PreparedDataset(data_copy)}, None)
    assert str(data_dataset) in str(info.value) and str(data_copy) in str(info.value)


def test_packed_windows_cover_the_split_once(data_dataset):
    ds = PreparedDataset(data_dataset)
    packed = PackedSequences(ds, 63)
    flat = all_tokens(data_dataset).astype(np.int64)
    assert len(packed) == ds.num_tokens // 64 and packed.dropped_tokens == ds.num_tokens % 64
    joined = np.concatenate([packed[i] for i in range(len(packed))])
    assert np.array_equal(joined, flat[:len(packed) * 64])
    with pytest.raises(IndexError):
        packed[len(packed)]
    assert len(PackedSequences(ds, ds.num_tokens)) == 0


@pytest.mark.parametrize("budget, size, expected", [
    (None, 1, list(range(10))), (10**9, 2, list(range(10))),    # no budget, or one all windows fit in
    (63 * 3, 1, [1, 5, 8]),            # 3 windows: the middle of each third of the split
    (63 * 3 + 1, 1, [1, 3, 6, 8]),     # a token over 3 windows takes a fourth
    (63 * 7, 3, [0, 2, 3, 5, 6, 7, 9]),
])
def test_eval_windows_are_spread_over_the_split_and_split_across_ranks(data_dataset, budget, size, expected):
    packed = PackedSequences(PreparedDataset(data_dataset, "val"), 63)
    packed.num_windows = 10  # a fixed count keeps the table simple
    shares = [eval_windows(packed, budget, r, size) for r in range(size)]
    assert sorted(i for s in shares for i in s) == expected
    assert shares == [expected[r::size] for r in range(size)]     # each rank its own, none twice
    assert shares == [eval_windows(packed, budget, r, size) for r in range(size)]


def test_a_tokenizer_copy_other_than_the_one_prepared_with_is_refused(data_dataset, data_copy):
    assert PreparedDataset(data_dataset).verified_tokenizer_dir() == data_dataset / "tokenizer"
    shutil.copy(PYTHIA_TOKENIZER / "tokenizer.json", data_copy / "tokenizer" / "tokenizer.json")
    with pytest.raises(UserError, match=r"the dataset's tokenizer copy is not the tokenizer it was prepared with"):
        PreparedDataset(data_copy).verified_tokenizer_dir()
    (data_copy / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"the dataset's tokenizer copy cannot be read"):
        PreparedDataset(data_copy).verified_tokenizer_dir()
