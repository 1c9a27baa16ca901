"""Tokenizers: load any Hugging Face tokenizer, hash it, copy it, or train a byte-level BPE.

A tokenizer is identified by `tokenizer_sha256`: the sha256 of its tokenizer.json as the
`tokenizers` library serialises it (keys sorted, padding/truncation settings dropped), so a
copy, a re-saved file and the hub original hash the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The package, not AutoTokenizer: that attribute pulls in torch, which only the rare
# slow-tokenizer conversion below needs, so it is resolved there.
import transformers
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from continual_pt.errors import UserError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "config.json")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_sha256(tokenizer_json: str) -> str:
    """sha256 of a tokenizer's serialisation, independent of formatting and inference settings."""
    data = json.loads(Tokenizer.from_str(tokenizer_json).to_str())
    data.pop("padding", None)
    data.pop("truncation", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class LoadedTokenizer:
    """A tokenizer ready for `cpt prepare`: its serialisation, identity and EOS."""

    name: str
    tokenizer_json: str
    sha256: str
    eos_token: str
    eos_id: int
    vocab_size: int
    """1 + the largest token id (len(tokenizer) when ids have no gaps)."""
    folder: Path | None = None
    """Folder holding its files; None when it only exists as `tokenizer_json`."""
    config: dict[str, Any] | None = None

    def copy_to(self, dest: Path) -> None:
        """Write a folder that AutoTokenizer.from_pretrained loads (the dataset's own copy)."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.folder is not None:
            for name in TOKENIZER_FILES:
                if (self.folder / name).is_file():
                    shutil.copyfile(self.folder / name, dest / name)
        if not (dest / "tokenizer.json").is_file():
            (dest / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        if not (dest / "tokenizer_config.json").is_file():
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                      "bos_token": self.eos_token, "unk_token": self.eos_token,
                      "clean_up_tokenization_spaces": False}
            (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _config_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hub_folder(name: str) -> Path:
    """Download (or find in the cache) the tokenizer files of a hub model."""
    try:
        return Path(snapshot_download(name, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as exc:  # the hub client raises many types; the message is what matters
        raise UserError(f"tokenizer {name!r}: not a local folder or file, and the hub could not provide it "
                        f"({type(exc).__name__}: {exc})") from None


def _from_transformers(name: str, folder: Path) -> tuple[str, dict[str, Any]]:
    """tokenizer.json text of a folder that only has slow-tokenizer files, via transformers."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for unloadable folders
        raise UserError(f"tokenizer {name!r}: cannot load {folder} ({exc})") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {name!r}: no fast (Rust) version available; cpt prepare needs one")
    return tok.backend_tokenizer.to_str(), {"eos_token": tok.eos_token}


def _resolve_eos(name: str, vocab: dict[str, int], config: dict[str, Any], eos_token: str | None) -> str:
    candidates = [eos_token] if eos_token else [_config_token(config, "eos_token"), EOS_TOKEN, "</s>", "<eos>"]
    for token in candidates:
        if token and token in vocab:
            return token
    if eos_token:
        raise UserError(f"tokenizer {name!r}: --eos-token {eos_token!r} is not in its vocabulary")
    raise UserError(f"tokenizer {name!r}: cannot tell its end-of-document token; pass --eos-token")


def load_tokenizer(name: str, eos_token: str | None = None) -> LoadedTokenizer:
    """Load a tokenizer folder, tokenizer.json file or hub name (UserError if none loads)."""
    path = Path(name).expanduser()
    config: dict[str, Any] = {}
    folder: Path | None = None
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        folder = path if path.is_dir() else _hub_folder(name)
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (folder / "tokenizer.json").is_file():
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        else:
            text, extra = _from_transformers(name, folder)
            config = {**config, **extra}
            folder = None  # its files are not a tokenizer.json; copy_to writes the converted one
    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"tokenizer {name!r}: not a valid tokenizer.json ({exc})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = _resolve_eos(name, vocab, config, eos_token)
    return LoadedTokenizer(name=name, tokenizer_json=text, sha256=canonical_sha256(text), eos_token=eos,
                           eos_id=vocab[eos], vocab_size=max(vocab.values()) + 1, folder=folder,
                           config=config or None)


def tokenizer_sha256(name: str) -> str:
    """The hash `check_tokenizer` compares: of a folder, file, hub name or a literal sha256."""
    if SHA256_RE.match(name) and not Path(name).exists():
        return name
    return load_tokenizer(name).sha256


# --------------------------------------------------------------------------- training


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE trained on an iterator of documents; `<|endoftext|>` gets id 0."""
    if vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: any text round-trips byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
