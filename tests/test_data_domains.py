"""Domains in prepared data: --domain-field and the SlimPajama and Pile layouts keep each document's
domain (counts in the manifest, token domains from document ends), deterministically; bad input is
named with exit 2 and nothing written; damaged document indexes are refused on open."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from continual_pt.cli import main
from continual_pt.data import domains, layouts, options, sources
from continual_pt.data.dataset import PreparedDataset
from continual_pt.errors import UserError
from tests.helpers import prepare_quietly

SLIM = layouts.SLIMPAJAMA_DOMAINS
PILE = ("Pile-CC", "Github", "Wikipedia (en)", "Gutenberg (PG-19)", "FreeLaw", "ArXiv")   # a few of its 22


def zst(lines: list[str], frames: int = 3) -> bytes:
    """Lines as a multi-frame zstd stream (parts compressed separately and concatenated, as the Pile's are)."""
    cuts = [len(lines) * i // frames for i in range(frames + 1)]
    c = zstandard.ZstdCompressor()
    return b"".join(c.compress("".join(lines[a:b]).encode()) for a, b in zip(cuts, cuts[1:]) if b > a)


def record(text: str, key: str, domain) -> str:
    return json.dumps({"text": text, "meta": {key: domain}}, ensure_ascii=False) + "\n"


class Corpus:
    """Documents written into a corpus folder, and the (text, domain) of each split in reading order."""

    def __init__(self, root: Path, key: str, names: tuple[str, ...], docs: list[str], seed: int = 0):
        self.root, self.key, self.names = root, key, names
        self.docs, self.rng = iter(docs), random.Random(seed)
        self.expected: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}

    def write(self, rel: str, split: str, n: int, frames: int = 3) -> None:
        docs = [(next(self.docs), self.names[self.rng.randrange(len(self.names))]) for _ in range(n)]
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zst([record(t, self.key, d) for t, d in docs], frames))
        self.expected[split] += docs


def slimpajama(root: Path, docs: list[str]) -> Corpus:
    """Its layout, with names whose natural order differs from their text order (chunk10, _train_10)."""
    corpus = Corpus(root, "redpajama_set_name", SLIM, docs, seed=1)
    for rel in ("chunk1/example_train_0", "chunk1/example_train_2", "chunk1/example_train_10",
                "chunk2/example_train_0", "chunk10/example_train_0"):
        corpus.write(f"train/{rel}.jsonl.zst", "train", 30)
    for rel in ("chunk1/example_holdout_0", "chunk2/example_holdout_0"):
        corpus.write(f"validation/{rel}.jsonl.zst", "val", 15)
    corpus.write("test/chunk1/example_holdout_0.jsonl.zst", "test", 10)
    (root / "README.md").write_text("# SlimPajama\n")
    (root / ".gitattributes").write_text("*.zst filter=lfs\n")
    return corpus


def pile(root: Path, docs: list[str]) -> Corpus:
    corpus = Corpus(root, "pile_set_name", PILE, docs, seed=2)
    for n in range(3):
        corpus.write(f"train/{n:02d}.jsonl.zst", "train", 40)
    corpus.write("val.jsonl.zst", "val", 25)
    corpus.write("test.jsonl.zst", "test", 10)
    return corpus


def token_counts(tokenizer: Path, docs: list[str]) -> list[int]:
    """Tokens per document as prepare counts them: the text's tokens and an EOS."""
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tok.encode_special_tokens = True
    return [len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]


def check_split(out: Path, split: str, docs: list[tuple[str, str]], tokenizer: Path) -> PreparedDataset:
    """The split holds `docs` in order, its manifest counts each domain's, and token_domains names every token."""
    ds = PreparedDataset(out, split, verify=True)
    lengths = token_counts(tokenizer, [t for t, _ in docs])
    names = [d for _, d in docs]
    assert ds.domain_docs == {n: names.count(n) for n in ds.domains}
    assert ds.domain_tokens == {n: sum(k for k, d in zip(lengths, names) if d == n) for n in ds.domains}
    expected = np.repeat([ds.domains.index(d) for d in names], lengths)
    assert np.array_equal(ds.token_domains(0, ds.num_tokens), expected)
    rng = np.random.default_rng(0)
    for start, stop in [(0, 1), (ds.num_tokens - 1, ds.num_tokens), (5, 5), *rng.integers(0, ds.num_tokens, (20, 2))]:
        start, stop = sorted((int(start), int(stop)))
        assert np.array_equal(ds.token_domains(start, stop), expected[start:stop])
    tok = Tokenizer.from_file(str(ds.tokenizer_dir / "tokenizer.json"))
    assert tok.decode(ds.tokens(0, ds.num_tokens).tolist(), skip_special_tokens=False) == \
        "".join(t + "<|endoftext|>" for t, _ in docs)
    return ds


@pytest.mark.parametrize("layout, make", [("slimpajama", slimpajama), ("pile", pile)])
def test_a_corpus_in_its_layout_round_trips_with_its_domains(tmp_path, data_tokenizer, data_docs, layout, make):
    corpus = make(tmp_path / layout, data_docs(300, seed=21))
    manifest = prepare_quietly([corpus.root], data_tokenizer, tmp_path / "out", layout=layout, shard_tokens=700)
    for split in ("train", "val"):
        ds = check_split(tmp_path / "out", split, corpus.expected[split], data_tokenizer)
        assert ds.num_docs == len(corpus.expected[split]) and len(ds.shards) > 1
    known = layouts.LAYOUT_TABLE[layout].domains
    assert manifest["domains"] == list(known) and set(corpus.names) <= set(known)
    assert manifest["domain_field"] == layouts.LAYOUT_TABLE[layout].domain_field
    assert manifest["val_fraction"] is None and manifest["layout"]["name"] == layout
    assert manifest["docs_without_domain"] == 0 and corpus.expected["test"]   # never read: check_split saw all


def test_domain_ranges_partition_the_split_by_domain(tmp_path, data_tokenizer, data_docs, monkeypatch):
    corpus = slimpajama(tmp_path / "sp", data_docs(300, seed=22))
    prepare_quietly([corpus.root], data_tokenizer, tmp_path / "out", layout="slimpajama")
    ds = PreparedDataset(tmp_path / "out")
    every = ds.token_domains(0, ds.num_tokens)
    monkeypatch.setattr(domains, "BLOCK", 7)   # ranges that cross scanning blocks are merged too
    covered = np.zeros(ds.num_tokens, dtype=int)
    for i, name in enumerate(ds.domains):
        ranges = ds.domain_ranges(name)
        assert np.array_equal(ranges, ds.domain_ranges(i)) and ranges.dtype == np.int64
        assert len(ranges) == 0 or (np.all(ranges[:, 0] < ranges[:, 1]) and np.all(ranges[1:, 0] > ranges[:-1, 1]))
        for start, stop in ranges:
            covered[start:stop] += 1
            assert np.all(every[start:stop] == i)
        assert int((ranges[:, 1] - ranges[:, 0]).sum()) == ds.domain_tokens[name]
    assert np.all(covered == 1)
    with pytest.raises(UserError, match="no domain 'RedPajamaNope'"):
        ds.domain_ranges("RedPajamaNope")


def output_files(out: Path) -> dict[str, bytes]:
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(found.pop("manifest.json"))
    del manifest["created_utc"], manifest["args"]
    return {**found, "manifest.json": json.dumps(manifest).encode()}


def test_the_same_corpus_gives_the_same_bytes_with_one_or_two_workers(tmp_path, data_tokenizer, data_docs,
                                                                       monkeypatch):
    corpus = slimpajama(tmp_path / "sp", data_docs(300, seed=23))
    prepare_quietly([corpus.root], data_tokenizer, tmp_path / "a", layout="slimpajama", shard_tokens=900)
    prepare_quietly([corpus.root], data_tokenizer, tmp_path / "b", layout="slimpajama", shard_tokens=900)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2048)   # many chunks, so two workers finish out of order
    prepare_quietly([corpus.root], data_tokenizer, tmp_path / "c", layout="slimpajama", shard_tokens=900, workers=2)
    a = output_files(tmp_path / "a")
    assert "train/doc_ends.npy" in a and "val/doc_domains.npy" in a
    assert a == output_files(tmp_path / "b") == output_files(tmp_path / "c")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def refused(argv: list[str], out: Path, capsys) -> str:
    """`cpt prepare` with argv exits 2 with one message, leaving nothing at out or beside it."""
    assert main(["prepare", *argv, "--out", str(out), "-q", "-j", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt prepare: error: "), err
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))
    return err.removeprefix("cpt prepare: error: ").strip()


def test_documents_without_a_domain_are_counted_and_refused_unless_named(tmp_path, data_tokenizer, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = [{"text": f"doc {i}", "meta": {"source": "web" if i % 2 else "code"}} for i in range(40)]
    jsonl(folder / "a.jsonl", good)
    bad = [dict(r) for r in good]
    bad[5] = {"text": "no meta"}
    bad[9] = {"text": "null", "meta": {"source": None}}
    bad[12] = {"text": "a number", "meta": {"source": 7}}
    bad[20] = {"text": "empty", "meta": {"source": ""}}
    jsonl(folder / "b.jsonl", bad)
    jsonl(folder / "c.jsonl", [{"text": "late", "meta": {}}] * 1 + good)
    argv = ["--source", str(folder), "--tokenizer", str(data_tokenizer), "--domain-field", "meta.source"]
    # c.jsonl's first record lacks it: refused before tokenizing, naming the fields there.
    msg = refused(argv, tmp_path / "o", capsys)
    assert msg.startswith(f"{folder / 'c.jsonl'}:1: no domain: the field 'meta.source' is missing") and \
        "fields of meta: none" in msg and "--unknown-domain NAME" in msg
    jsonl(folder / "c.jsonl", good + [{"text": "late", "meta": {}}])
    msg = refused(argv, tmp_path / "o", capsys)
    assert msg.startswith(f"{folder / 'b.jsonl'}:6: no domain: the field 'meta.source' is missing, empty or not a "
                          "string in 5 document(s) (the first is here)"), msg
    assert main(["prepare", *argv, "--out", str(tmp_path / "ok"), "-q", "--unknown-domain", "unknown",
                 "--val-fraction", "0"]) == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["domains"] == ["code", "web", "unknown"] and manifest["docs_without_domain"] == 5
    by_domain = manifest["splits"]["train"]["by_domain"]
    assert [by_domain[n]["num_docs"] for n in manifest["domains"]] == [20 + 18 + 20, 20 + 18 + 20, 5]


def test_a_layout_refuses_a_folder_without_its_files(tmp_path, data_tokenizer, data_docs, capsys):
    corpus = pile(tmp_path / "pile", data_docs(200, seed=24))
    base = ["--tokenizer", str(data_tokenizer)]
    msg = refused(["--layout", "slimpajama", "--source", str(corpus.root), *base], tmp_path / "o", capsys)
    assert msg == (f"{corpus.root}: not laid out as --layout slimpajama reads it (cerebras/SlimPajama-627B): expected "
                   "train/chunk*/*.jsonl.zst and validation/chunk*/*.jsonl.zst, found no train/chunk*/*.jsonl.zst and "
                   "no validation/chunk*/*.jsonl.zst (the folder holds test.jsonl.zst, train/, val.jsonl.zst)")
    (tmp_path / "empty").mkdir()
    msg = refused(["--layout", "pile", "--source", str(tmp_path / "empty"), *base], tmp_path / "o", capsys)
    assert msg.endswith("found no train/*.jsonl.zst and no val.jsonl.zst (the folder holds nothing)")
    msg = refused(["--layout", "pile", "--source", str(corpus.root / "val.jsonl.zst"), *base], tmp_path / "o", capsys)
    assert msg == (f"{corpus.root / 'val.jsonl.zst'}: --layout pile reads a corpus folder as the Pile ships it "
                   "(train/*.jsonl.zst and val.jsonl.zst); there is a file at this path")
    (corpus.root / "train" / "01.jsonl").write_text('{"text": "stray"}\n')
    msg = refused(["--layout", "pile", "--source", str(corpus.root), *base], tmp_path / "o", capsys)
    assert msg.startswith(f"{corpus.root}: 1 file(s) that --layout pile does not read in its split folders: "
                          "train/01.jsonl") and "--skip-unknown" in msg
    msg = refused(["--source", str(corpus.root), *base, "--unknown-domain", "x"], tmp_path / "o", capsys)
    assert "--unknown-domain needs --domain-field or --layout" in msg
    (tmp_path / "a.txt").write_text("plain text")
    msg = refused(["--source", str(tmp_path / "a.txt"), *base, "--domain-field", "meta.x"], tmp_path / "o", capsys)
    assert msg.startswith(f"{tmp_path / 'a.txt'}: no domain") and "without fields" in msg


@pytest.mark.parametrize("kind", ["parquet", "hf-disk"])
def test_a_column_or_a_struct_field_of_one_is_a_domain(tmp_path, data_tokenizer, data_docs, kind):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = data_docs(60, seed=25)
    names = [("books", "web", "code")[i % 3] for i in range(60)]
    table = pa.table({"text": docs, "source": names, "meta": [{"redpajama_set_name": n} for n in names]})
    if kind == "parquet":
        src = tmp_path / "in.parquet"
        pq.write_table(table, src, row_group_size=7)
    else:
        src = tmp_path / "hf"
        datasets.Dataset(table).save_to_disk(str(src))
    for field in ("source", "meta.redpajama_set_name"):
        out = tmp_path / field
        manifest = prepare_quietly([src], data_tokenizer, out, domain_field=field, val_fraction=0.0)
        assert manifest["domains"] == ["books", "web", "code"]
        check_split(out, "train", list(zip(docs, names)), data_tokenizer)
    with pytest.raises(UserError, match=r"row 1: no domain: the field 'meta.nope'"):
        prepare_quietly([src], data_tokenizer, tmp_path / "o", domain_field="meta.nope")


@pytest.fixture(scope="module")
def with_domains(tmp_path_factory, data_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("with_domains")
    rows = [{"text": f"document {i} " + "word " * (i % 13), "source": ("a", "b", "c")[i % 3]} for i in range(200)]
    prepare_quietly([jsonl(root / "in.jsonl", rows)], data_tokenizer, root / "ds", domain_field="source",
                    val_fraction=0.2)
    return root / "ds"


def damaged(src: Path, tmp_path: Path, damage) -> Path:
    import shutil

    copy = Path(shutil.copytree(src, tmp_path / "copy"))
    damage(copy)
    return copy


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "train" / "doc_ends.npy").write_bytes((d / "train" / "doc_ends.npy").read_bytes()[:-8]),
     r"train/doc_ends.npy: truncated or corrupt document index"),
    (lambda d: (d / "val" / "doc_domains.npy").unlink(), r"val/doc_domains.npy: document index missing"),
    (lambda d: (d / "train" / "doc_domains.npy").write_bytes(b"not numpy"), r"doc_domains.npy: not a readable .npy"),
    (lambda d: np.save(d / "train" / "doc_ends.npy", np.load(d / "train" / "doc_ends.npy")[:-1]),
     r"doc_ends.npy: holds int64 x \(\d+,\), the manifest says int64 x"),
    (lambda d: edit_manifest(d, lambda m: m["splits"]["train"]["by_domain"]["a"].update(num_docs=0)),
     r"manifest.json: corrupt manifest: split 'train': by_domain counts"),
    (lambda d: edit_manifest(d, lambda m: m.update(domains=["a", "a", "c"])), r"not a list of distinct names"),
])
def test_a_damaged_document_index_is_refused_on_open(tmp_path, with_domains, damage, match):
    assert PreparedDataset(with_domains).domains == ["a", "b", "c"]
    copy = damaged(with_domains, tmp_path, damage)
    with pytest.raises(UserError, match=match):
        for split in ("train", "val"):
            PreparedDataset(copy, split)


def test_verify_checks_the_document_index_content(tmp_path, with_domains):
    def flip(d: Path) -> None:
        ids = np.load(d / "train" / "doc_domains.npy")
        ids[3] = 9
        np.save(d / "train" / "doc_domains.npy", ids)

    copy = damaged(with_domains, tmp_path, flip)
    PreparedDataset(copy)   # sizes agree: opening alone does not read the content
    with pytest.raises(UserError, match=r"doc_domains.npy: corrupt document index \(sha256 differs"):
        PreparedDataset(copy, verify=True)
    edit_manifest(copy, lambda m: m["splits"]["train"]["documents"]["domains"].update(
        sha256=domains.file_sha256(copy / "train" / "doc_domains.npy")))
    with pytest.raises(UserError, match="domain ids beyond the 3 domains"):
        PreparedDataset(copy, verify=True)


def test_a_dataset_without_domains_reads_as_before(data_dataset):
    ds = PreparedDataset(data_dataset, verify=True)
    assert ds.domains == [] and ds.domain_tokens == {} and ds.domain_docs == {}
    with pytest.raises(UserError, match="has no domains .*--domain-field"):
        ds.token_domains(0, 10)
    assert not (data_dataset / "train" / "doc_ends.npy").exists()


def test_token_domains_is_pickled_without_its_memmaps(with_domains):
    import pickle

    ds = PreparedDataset(with_domains, "val")
    before = ds.token_domains(0, ds.num_tokens)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.domain_index._arrays == {} and np.array_equal(clone.token_domains(0, ds.num_tokens), before)
    with pytest.raises(IndexError):
        ds.token_domains(0, ds.num_tokens + 1)


def test_the_layout_table_is_the_option_choices():
    assert tuple(layouts.LAYOUT_TABLE) == options.LAYOUTS
    assert len(layouts.PILE_DOMAINS) == 22 and len(SLIM) == 7


def test_an_interrupted_output_with_a_document_index_is_replaced_by_overwrite(tmp_path, with_domains, data_tokenizer):
    import shutil

    out = Path(shutil.copytree(with_domains, tmp_path / "ds"))
    (out / "manifest.json").unlink()   # as a killed run's output renamed by hand
    src = jsonl(tmp_path / "x.jsonl", [{"text": "one", "source": "a"}])
    with pytest.raises(UserError, match="output of an interrupted run"):
        prepare_quietly([src], data_tokenizer, out, domain_field="source")
    prepare_quietly([src], data_tokenizer, out, domain_field="source", overwrite=True, val_fraction=0.0)
    assert PreparedDataset(out).domain_docs == {"a": 1}


def test_a_hub_dataset_streams_its_domain_column(tmp_path, monkeypatch, data_tokenizer, data_docs):
    import datasets

    docs = data_docs(30, seed=26)
    names = [("x", "y")[i % 2] for i in range(30)]
    rows = {"text": docs, "meta": [{"set": n} for n in names]}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict(rows).to_iterable_dataset())
    manifest = prepare_quietly(["hf:org/mix"], data_tokenizer, tmp_path / "out", domain_field="meta.set",
                               val_fraction=0.0)
    assert manifest["domains"] == ["x", "y"]
    check_split(tmp_path / "out", "train", list(zip(docs, names)), data_tokenizer)
    assert PreparedDataset(tmp_path / "out", "val").token_domains(0, 0).size == 0
