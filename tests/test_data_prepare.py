"""`cpt prepare`: every input format round-trips, the split is disjoint and stable, output is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from continual_pt.data.dataset import PreparedDataset
from continual_pt.data.encode import is_val, val_threshold
from tests.helpers import PYTHIA_TOKENIZER, prepare_quietly

PYTHIA = PYTHIA_TOKENIZER
EOS = "<|endoftext|>"


def write_input(kind: str, docs: list[str], root: Path) -> Path:
    """docs written as one input of `kind`; the path to pass as --source."""
    lines = "".join(json.dumps({"text": d, "meta": {"n": i}}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    if kind == "jsonl":
        path = root / "in.jsonl"
        path.write_text(lines, encoding="utf-8")
    elif kind == "jsonl.zst":
        import zstandard

        path = root / "in.jsonl.zst"
        half = len(lines) // 2
        cut = lines.index("\n", half) + 1
        # Two frames, as concatenated shards of the Pile are.
        c = zstandard.ZstdCompressor()
        path.write_bytes(c.compress(lines[:cut].encode()) + c.compress(lines[cut:].encode()))
    elif kind == "jsonl.gz":
        import gzip

        path = root / "in.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode()))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "in.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    elif kind == "txt":
        path = root / "txt"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"doc{i:04d}.txt").write_text(d, encoding="utf-8", newline="")
    elif kind == "hf-disk":
        import datasets

        path = root / "hf"
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


def decode_split(out: Path, split: str) -> str:
    ds = PreparedDataset(out, split)
    tok = Tokenizer.from_file(str(ds.tokenizer_dir / "tokenizer.json"))
    return tok.decode(ds.tokens(0, ds.num_tokens).tolist(), skip_special_tokens=False)


def expected_split(docs: list[str], val_fraction: float, split: str) -> str:
    threshold = val_threshold(val_fraction)
    return "".join(d + EOS for d in docs if is_val(d, threshold) == (split == "val"))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "jsonl.gz", "parquet", "txt", "hf-disk"])
@pytest.mark.parametrize("tokenizer", ["trained", "pythia"])
def test_round_trip(kind, tokenizer, tmp_path, data_docs, data_tokenizer):
    docs = data_docs(60, seed=3)
    tok = data_tokenizer if tokenizer == "trained" else PYTHIA
    src = write_input(kind, docs, tmp_path)
    manifest = prepare_quietly([src], tok, tmp_path / "out", val_fraction=0.2, shard_tokens=997)
    for split in ("train", "val"):
        assert decode_split(tmp_path / "out", split) == expected_split(docs, 0.2, split)
    assert manifest["splits"]["train"]["num_docs"] + manifest["splits"]["val"]["num_docs"] == len(docs)
    assert manifest["splits"]["val"]["num_docs"] > 0


def test_literal_eos_in_text_is_not_a_separator(tmp_path, data_tokenizer):
    docs = [f"a {EOS} b", EOS, f"{EOS}{EOS} c"]
    manifest = prepare_quietly([write_input("jsonl", docs, tmp_path)], data_tokenizer, tmp_path / "out", val_fraction=0.0)
    ds = PreparedDataset(tmp_path / "out")
    tokens = ds.tokens(0, ds.num_tokens)
    assert manifest["splits"]["train"]["num_docs"] == 3
    assert int((tokens == ds.eos_id).sum()) == 3  # one per document, none from the text
    assert decode_split(tmp_path / "out", "train") == "".join(d + EOS for d in docs)


def test_truncation_in_tokenizer_json_is_ignored(tmp_path, data_tokenizer, data_docs):
    tok = Tokenizer.from_file(str(data_tokenizer / "tokenizer.json"))
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=8)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    docs = data_docs(10, seed=4)
    prepare_quietly([write_input("jsonl", docs, tmp_path)], folder, tmp_path / "out", val_fraction=0.0)
    assert decode_split(tmp_path / "out", "train") == "".join(d + EOS for d in docs)


def test_manifest_records_what_the_reader_needs(tmp_path, data_tokenizer, data_docs):
    src = write_input("jsonl", data_docs(50, seed=5), tmp_path)
    m = prepare_quietly([src], data_tokenizer, tmp_path / "out", val_fraction=0.1, shard_tokens=300)
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["eos_id"] == 0
    assert m["vocab_size"] == Tokenizer.from_file(str(data_tokenizer / "tokenizer.json")).get_vocab_size(True)
    assert m["sources"][0]["files"][0]["size"] == src.stat().st_size
    train = m["splits"]["train"]
    assert len(train["shards"]) > 2 and all(s["num_tokens"] <= 300 for s in train["shards"])
    assert sum(s["num_tokens"] for s in train["shards"]) == train["num_tokens"]
    assert m["args"]["val_fraction"] == 0.1 and m["text_field"] == "text"
    # The tokenizer copy is a folder AutoTokenizer can load: the dataset is self-contained.
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert auto.eos_token_id == 0 and len(auto) == m["vocab_size"]


def test_split_is_disjoint_and_stable_when_the_corpus_grows(tmp_path, data_tokenizer, data_docs):
    small, extra = data_docs(150, seed=6), data_docs(150, seed=7)
    prepare_quietly([write_input("jsonl", small, tmp_path)], data_tokenizer, tmp_path / "a", val_fraction=0.2)
    (tmp_path / "grown").mkdir()
    prepare_quietly([write_input("jsonl", extra + small, tmp_path / "grown")], data_tokenizer, tmp_path / "b", val_fraction=0.2)

    def side(text: dict[str, str], doc: str) -> str:
        # Documents have unique "document s-i:" prefixes, so a substring test finds exactly them.
        found = [split for split in ("train", "val") if text[split].count(doc + EOS) == 1]
        assert len(found) == 1, f"{doc[:20]!r} is in {found or 'no split'}"
        return found[0]

    before = {s: decode_split(tmp_path / "a", s) for s in ("train", "val")}
    after = {s: decode_split(tmp_path / "b", s) for s in ("train", "val")}
    sides = {d: side(before, d) for d in small}
    assert 10 < sum(v == "val" for v in sides.values()) < 60  # about 20 %
    assert all(side(after, d) == sides[d] for d in small)  # nothing moved when the corpus grew
    assert {side(after, d) for d in extra} == {"train", "val"}
    assert sum(len(d + EOS) for d in extra + small) == sum(map(len, after.values()))


def test_same_bytes_with_one_and_two_workers(tmp_path, monkeypatch, data_tokenizer, data_docs):
    from continual_pt.data import sources

    src = write_input("jsonl", data_docs(3000, seed=8), tmp_path)
    m1 = prepare_quietly([src], data_tokenizer, tmp_path / "w1", workers=1, shard_tokens=20000, val_fraction=0.05)
    # Small chunks, so that two workers really interleave and finish out of order.
    monkeypatch.setattr(sources, "CHUNK_BYTES", 8192)
    assert len(list(sources.iter_chunks(sources.resolve_sources([str(src)], "text"), "text", 8192))) > 50
    m2 = prepare_quietly([src], data_tokenizer, tmp_path / "w2", workers=2, shard_tokens=20000, val_fraction=0.05)
    for split in ("train", "val"):
        assert m1["splits"][split] == m2["splits"][split]
    assert len(m1["splits"]["train"]["shards"]) > 3


def test_kjv_is_one_document_per_chapter(tmp_path, data_tokenizer):
    m = prepare_quietly(["kjv"], data_tokenizer, tmp_path / "kjv", val_fraction=0.0, workers=2)
    assert m["splits"]["train"]["num_docs"] == 1189  # chapters of the King James Bible
    ds = PreparedDataset(tmp_path / "kjv")
    tok = Tokenizer.from_file(str(ds.tokenizer_dir / "tokenizer.json"))
    first = tok.decode(ds.tokens(0, 4000).tolist(), skip_special_tokens=False).split(EOS)[0]
    assert first.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert first.endswith("And the evening and the morning were the sixth day.")


def test_python_stdlib_source_lists_sorted_files_one_per_document():
    import sysconfig

    from continual_pt.data import sources

    files = sources._stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and (root / "os.py") in files
    keys = [p.relative_to(root).as_posix() for p in files]
    assert keys == sorted(keys) and not any("site-packages" in k for k in keys)
    chunk = next(sources.StdlibSource().chunks("text", chunk_bytes=1))
    assert chunk.kind == "files" and chunk.lenient and chunk.payload[0][0] == str(files[0])


def test_uint32_when_the_vocabulary_needs_it(tmp_path, data_tokenizer):
    tok = Tokenizer.from_file(str(data_tokenizer / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(66_000)])
    big = tmp_path / "big.json"
    tok.save(str(big))
    doc = "x <extra_65999> y"
    prepare_quietly([write_input("jsonl", [doc], tmp_path)], big, tmp_path / "out", val_fraction=0.0)
    ds = PreparedDataset(tmp_path / "out")
    assert ds.dtype == np.uint32 and ds.vocab_size > 65536
    assert int(ds.tokens(0, ds.num_tokens).max()) == tok.token_to_id("<extra_65999>")
    assert decode_split(tmp_path / "out", "train") == doc + EOS


def test_hub_dataset_is_streamed(tmp_path, monkeypatch, data_tokenizer, data_docs):
    import datasets

    docs = data_docs(40, seed=13)
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    m = prepare_quietly(["hf:org/corpus"], data_tokenizer, tmp_path / "out", val_fraction=0.0, hf_config="en", hf_split="valid")
    assert calls == [("org/corpus", "en", "valid", True)]
    assert decode_split(tmp_path / "out", "train") == "".join(d + EOS for d in docs)
    assert m["sources"][0] == {"spec": "hf:org/corpus", "kind": "hf-hub", "name": "org/corpus", "config": "en",
                               "split": "valid"}
