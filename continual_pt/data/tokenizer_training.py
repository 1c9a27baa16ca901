"""`cpt tokenizer train`: a byte-level BPE trained on any source, saved as a Hugging Face folder.

    cpt tokenizer train --source kjv --vocab-size 4096 --out data/tok

Kept apart from tokenizer.py so that reading datasets (which loads tokenizers) does not
import the source readers and their Hugging Face `datasets` dependency.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from continual_pt.data import output, sources
from continual_pt.data.options import TokenizerOptions
from continual_pt.data.tokenizer import EOS_TOKEN, TOKENIZER_FILES, LoadedTokenizer, train_bpe
from continual_pt.layout import EXIT_OK

TOKENIZER = output.OutputKind("a tokenizer", "tokenizer.json",
                              re.compile("|".join(map(re.escape, TOKENIZER_FILES))))


def _limited(texts: Iterable[str], max_bytes: float | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(text)
        yield text


def train_tokenizer(options: TokenizerOptions) -> int:
    """`cpt tokenizer train`: train a byte-level BPE and save it as a Hugging Face folder."""
    out = Path(options.out)
    output.check_destination(out, options.overwrite, TOKENIZER)
    srcs = sources.resolve_sources(options.sources, options.text_field, options.hf_split, options.hf_config,
                                   options.skip_unknown)
    for note in [] if options.quiet else sources.skipped_notes(srcs):
        print(note, file=sys.stderr)
    start = time.perf_counter()
    max_bytes = None if options.max_mb is None else options.max_mb * 1e6
    tokenizer = train_bpe(_limited(sources.iter_documents(srcs, options.text_field), max_bytes),
                          options.vocab_size, options.min_frequency)
    if tokenizer.token_to_id(EOS_TOKEN) != 0:
        raise RuntimeError("the trained tokenizer lost its EOS token at id 0")
    with output.atomic_directory(out, options.overwrite) as tmp:
        loaded = LoadedTokenizer(name=str(out), tokenizer_json=tokenizer.to_str(), sha256="", eos_token=EOS_TOKEN,
                                 eos_id=0, vocab_size=tokenizer.get_vocab_size(True))
        loaded.copy_to(tmp)
    if not options.quiet:
        print(f"trained a byte-level BPE of {tokenizer.get_vocab_size(True)} tokens in "
              f"{time.perf_counter() - start:.1f} s -> {out}")
    return EXIT_OK
