"""`cpt tokenizer train` and tokenizer identity (the hash every dataset records)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from continual_pt.cli import main
from continual_pt.data.tokenizer import load_tokenizer, tokenizer_sha256
from continual_pt.errors import UserError
from tests.helpers import PYTHIA_TOKENIZER

PYTHIA = PYTHIA_TOKENIZER


def test_train_cli_writes_a_hugging_face_tokenizer(tmp_path, data_docs, capsys):
    src = tmp_path / "corpus.jsonl"
    docs = data_docs(300, seed=21)
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "-s", str(src), "--text-field", "body", "--vocab-size", "300",
                 "-o", str(out)]) == 0
    assert "byte-level BPE of 300 tokens" in capsys.readouterr().out
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == 0 and len(auto) == 300
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for doc in docs[:20]:
        ids = raw.encode(doc, add_special_tokens=False).ids
        assert auto(doc, add_special_tokens=False)["input_ids"] == ids
        assert raw.decode(ids, skip_special_tokens=False) == doc  # byte-level, no normaliser: exact
    # Training is deterministic, and an existing tokenizer is not replaced without --overwrite.
    assert main(["tokenizer", "train", "-s", str(src), "--text-field", "body", "--vocab-size", "300",
                 "-o", str(out)]) == 2
    assert "already a tokenizer" in capsys.readouterr().err
    again = tmp_path / "again"
    main(["tokenizer", "train", "-s", str(src), "--text-field", "body", "--vocab-size", "300", "-o", str(again), "-q"])
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_train_rejects_a_vocabulary_below_the_byte_alphabet(tmp_path, capsys):
    assert main(["tokenizer", "train", "-s", "kjv", "--vocab-size", "100", "-o", str(tmp_path / "t")]) == 2
    assert "at least 257" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_pythia_tokenizer_identity():
    tok = load_tokenizer(str(PYTHIA))
    assert (tok.eos_id, tok.eos_token, tok.vocab_size) == (0, "<|endoftext|>", 50277)


def test_hash_ignores_formatting_and_inference_settings(tmp_path, data_tokenizer):
    base = tokenizer_sha256(str(data_tokenizer))
    raw = Tokenizer.from_file(str(data_tokenizer / "tokenizer.json"))
    raw.enable_truncation(max_length=16)
    resaved = tmp_path / "resaved.json"
    resaved.write_text(json.dumps(json.loads(raw.to_str()), indent=4))
    assert tokenizer_sha256(str(resaved)) == base
    raw.add_tokens(["<new>"])
    raw.save(str(tmp_path / "changed.json"))
    assert tokenizer_sha256(str(tmp_path / "changed.json")) != base
    assert tokenizer_sha256(str(PYTHIA)) != base
    assert tokenizer_sha256(base) == base  # a literal hash passes through


def test_unknown_tokenizer_name_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder or file"):
        load_tokenizer("no-such-org/no-such-tokenizer")
