"""The `cpt` command. Each subcommand names the function that does the work and the options
dataclass it takes; its arguments are built from that dataclass's fields (`continual_pt.options`),
so the command line and the code it reaches declare each option once.

The function's module is imported only once its subcommand is chosen (the options live in light
modules of their own), so `cpt --help` answers without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, NoReturn

from continual_pt import __version__
from continual_pt.errors import UserError
from continual_pt.files import environment_fault
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
    SWEEP_PLAN,
    TAG_PREFIX,
    UNIVERSAL,
)
from continual_pt.options import Option, declared, default_of, shows_default

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


@dataclass(frozen=True)
class Command:
    """One subcommand: its words, the "module:function" doing the work, the "module:Class" of the options
    dataclass it takes, its help."""

    words: tuple[str, ...]
    target: str
    options: str
    help: str
    description: str | None = None
    epilog: str | None = None


COMMANDS = (
    Command(("demo",), "continual_pt.demo.command:run_demo", "continual_pt.demo.options:DemoOptions",
            "the paper's experiment at laptop scale, offline: a grid of runs and REPORT.md",
            "Continue a small GPT-NeoX pre-trained on an upstream corpus (shipped) on a downstream one, both "
            "built from offline sources, through a miniature of the paper's grid (`cpt sweep --local`); score "
            "every run (`cpt eval`), draw the paper's figures and write REPORT.md: holds / does not hold per "
            "finding. With --upstream and --downstream, the same study on a sample of your own corpora (its "
            "upstream model pre-trained here). Run it again to continue a stopped demo."),
    Command(("train",), "continual_pt.training.loop:run_phase", "continual_pt.options:ConfigSource",
            "run one continual pre-training phase on the DeepSpeed engine",
            "Train (or re-warm) a model on prepared data. Run it directly for one process, or under deepspeed, "
            "torchrun, srun or mpirun for several: `python -m continual_pt.train` takes the same arguments. "
            f"SIGTERM/SIGUSR1 and a first Ctrl-C save a committed checkpoint and exit {EXIT_RESUMABLE} (run the "
            "same command again to resume: checkpoint.resume=auto); a second Ctrl-C aborts at once. One run at a "
            "time per run directory."),
    Command(("launch",), "continual_pt.training.supervise:launch",
            "continual_pt.training.options:LaunchOptions",
            "run a launcher command (deepspeed, torchrun, mpirun) so that a stop signal saves and exits "
            f"{EXIT_RESUMABLE}",
            "Run COMMAND (a launcher starting continual_pt.train) in a session of its own. SIGTERM, SIGUSR1, "
            "SIGHUP or a first Ctrl-C sent to cpt launch becomes a stop request in the run directory (<run "
            f"dir>/{STOP}) that every rank acts on at the same step boundary, on every node; cpt launch then "
            f"waits for every rank to exit and exits {EXIT_RESUMABLE} once the run has committed its checkpoint "
            "(run the same command again to resume). Otherwise it exits with the launcher's status. A second "
            "Ctrl-C kills the launcher's processes at once.",
            "example: cpt launch -- deepspeed --hostfile launch/hostfile -m continual_pt.train --config run.yaml"),
    Command(("stop",), "continual_pt.training.supervise:request", "continual_pt.training.options:StopOptions",
            f"ask a running run, on any node, to save a committed checkpoint and exit {EXIT_RESUMABLE}",
            f"Write <run dir>/{STOP}: rank 0 of the run sees it within a second, every rank saves at the same "
            f"step boundary and the run exits {EXIT_RESUMABLE} (resume by running it again). The run answers "
            f"in <run dir>/{STOP_DONE}."),
    Command(("sweep",), "continual_pt.sweep.plan:run_sweep", "continual_pt.sweep.options:SweepOptions",
            "expand a grid of runs (axes over any config key, baselines) into configs; run or submit them",
            "Expand GRID into one resolved, validated run config per run, with stable names, under the sweep "
            f"directory (configs/<run>.yaml, {SWEEP_PLAN}, runs/<run>/). Every problem of the grid is reported at "
            "once before anything is written. Without a mode, prints the plan and writes it.",
            "example: cpt sweep --grid configs/sweeps/small.yaml --dry-run"),
    Command(("config",), "continual_pt.config.load:print_resolved", "continual_pt.options:ConfigSource",
            "print the resolved run config (defaults < file < overrides), validated",
            f"Resolve and validate a run config and print it as YAML; exits {EXIT_USAGE} listing every problem "
            "if it is invalid."),
    Command(("schedule", "plot"), "continual_pt.results.schedule_views:plot",
            "continual_pt.results.options:SchedulePlotOptions",
            "draw LR vs step for one or several schedules into a PNG"),
    Command(("schedule", "show"), "continual_pt.results.schedule_views:show",
            "continual_pt.results.options:ScheduleShowOptions",
            "print the LR at chosen steps"),
    Command(("prepare",), "continual_pt.data.prepare:run_prepare", "continual_pt.data.options:PrepareOptions",
            "tokenize raw text once into packed, memory-mappable token shards",
            "Tokenize documents into a dataset directory: uint16/uint32 token shards (EOS between documents), "
            "a hash-chosen validation split (with --layout, the corpus's own) and manifest.json; with "
            "--domain-field or --layout, each document's domain."),
    Command(("tokenizer", "train"), "continual_pt.data.tokenizer_training:train_tokenizer",
            "continual_pt.data.options:TokenizerOptions",
            "train a byte-level BPE of a chosen vocabulary size",
            "Train a byte-level BPE with the `tokenizers` library and save it as a Hugging Face tokenizer folder."),
    Command(("export",), "continual_pt.checkpoint.weights:run_export",
            "continual_pt.checkpoint.options:ExportOptions",
            "write a Hugging Face folder (model + tokenizer) from a committed checkpoint",
            "Convert a committed checkpoint into a folder that AutoModelForCausalLM.from_pretrained loads "
            "without DeepSpeed."),
    Command(("checkpoint", "info"), "continual_pt.checkpoint.info:run_info",
            "continual_pt.checkpoint.options:InfoOptions",
            "step, tokens, world size, ZeRO stage, precision, committed or not, files",
            "What a checkpoint holds, checked against its commit marker: what to look at before resuming it on "
            "another allocation."),
    Command(("checkpoint", "convert"), "continual_pt.checkpoint.info:run_convert",
            "continual_pt.checkpoint.options:ConvertOptions",
            "convert a committed checkpoint to DeepSpeed's universal format ahead of time",
            f"Write {CHECKPOINTS}/{UNIVERSAL}/{TAG_PREFIX}<N> beside the checkpoint (which is only read), under "
            "the commit protocol. A resume with another world size or ZeRO stage (checkpoint.elastic: auto) "
            "makes and reuses the same conversion."),
    Command(("eval",), "continual_pt.evaluation.command:run_eval", "continual_pt.evaluation.options:EvalOptions",
            "score checkpoints on named held-out sets (and lm-eval tasks) into an incremental results store",
            "Token-weighted loss and perplexity of checkpoints on held-out sets, and with --lm-eval the metrics "
            "of lm-evaluation-harness tasks. Runs as one process or under deepspeed, torchrun, srun or mpirun "
            "(`python -m continual_pt.evaluate` takes the same arguments); the losses do not depend on the "
            "number of ranks. Rows already in the store (same checkpoint, set, budget, seq len, dtype; for a "
            "task, same harness and task versions, few-shot count and limit) are skipped."),
    Command(("plot",), "continual_pt.results.plots:run_plot", "continual_pt.results.options:PlotOptions",
            "draw validation loss vs tokens per held-out set, one line per run, with the LR schedule",
            "The paper's figures: one panel of validation loss vs tokens per held-out set (in-loop evaluations "
            f"from {METRICS}, or cpt eval scores from {SCORES}), one line per run, and a panel of the learning "
            "rate vs tokens. Writes OUT.png and OUT.svg."),
    Command(("report",), "continual_pt.results.report:run_report",
            "continual_pt.results.options:ReportOptions",
            "a markdown table comparing runs: final/best loss, forgetting, gain over a baseline",
            "Per run: final and best loss and perplexity on the upstream and downstream sets, the forgetting "
            "(final upstream loss minus the step-0 upstream loss) and the gain over a baseline run (its final "
            "downstream loss minus the run's; positive is better)."),
)
FAMILIES = {   # the first word of two-word commands: its help and description
    "schedule": ("plot or print learning-rate schedules",
                 "Inspect learning-rate schedules without training. A schedule comes from a run config (--config "
                 "plus overrides) or from inline specs (--spec 'name=cosine max_lr=3e-4 warmup=0.01')."),
    "tokenizer": ("train a byte-level BPE tokenizer on a source", None),
    "checkpoint": ("inspect a checkpoint, or convert it for another world size or ZeRO stage", None),
}
TYPES = {"int": int, "float": float, "str": str}


def argument(field: dataclasses.Field, opt: Option) -> tuple[list[str], dict[str, Any]]:
    """The names and keywords of `add_argument` for one options field: its type, default and choices are
    the field's, its help says the default."""
    default, kind = default_of(field), str(field.type).removesuffix(" | None")
    shown = f" (default: {default})" if shows_default(default) and not opt.positional else ""
    kw: dict[str, Any] = {"help": opt.help + shown}
    kw.update({k: v for k, v in (("metavar", opt.metavar), ("choices", opt.choices)) if v is not None})
    if opt.positional:
        kw.update({k: v for k, v in (("nargs", opt.nargs), ("default", default)) if v not in (None, MISSING)})
        return [field.name], kw
    names = list(opt.flags) or ["--" + field.name.replace("_", "-")]
    kw["dest"] = field.name
    if kind == "bool":
        return names, {**kw, "action": "store_true"}
    if kind == "list[str]":
        kw["action"] = "append"
    else:
        kw["type"] = TYPES[kind]
    return names, {**kw, **({"required": True} if default is MISSING else {"default": default})}


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """Declare every field of an options dataclass on `parser`, in its group and exclusive set."""
    groups: dict[Any, Any] = {}
    for field in dataclasses.fields(options):
        opt = declared(field)
        where = parser
        if opt.group:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group, getattr(options, "GROUPS", {}).get(opt.group))
            where = groups[opt.group]
        if opt.exclusive:
            if (opt.group, opt.exclusive) not in groups:
                groups[(opt.group, opt.exclusive)] = where.add_mutually_exclusive_group()
            where = groups[(opt.group, opt.exclusive)]
        names, kw = argument(field, opt)
        where.add_argument(*names, **kw)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `cpt` parser. Only the subcommand `argv` names gets its arguments (and its options module
    imported), so `cpt --help` and a subcommand start without declaring the rest; None: every one."""
    parser = argparse.ArgumentParser(
        prog="cpt",
        description="Continual pre-training of language models on DeepSpeed: prepare data, re-warm and "
                    "re-decay the learning rate, resume exactly after preemption, evaluate on held-out "
                    "upstream and downstream data.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"continual-pt {__version__}")
    # "cpt_command", not "command": the dest of an option of the same name (cpt launch's) would overwrite it.
    top = parser.add_subparsers(dest="cpt_command", required=True, metavar="command")
    words = None if argv is None else [a for a in argv if not a.startswith("-")][:2]
    families: dict[str, Any] = {}
    for command in COMMANDS:
        where, word = top, command.words[0]
        if len(command.words) == 2:
            if word not in families:
                help_text, description = FAMILIES[word]
                family = top.add_parser(word, help=help_text, description=description)
                words_of = sorted(c.words[1] for c in COMMANDS if c.words[0] == word)
                families[word] = family.add_subparsers(dest=f"{word}_command", required=True,
                                                       metavar="{" + ",".join(words_of) + "}")
            where, word = families[word], command.words[1]
        sub = where.add_parser(word, help=command.help, description=command.description or command.help,
                               epilog=command.epilog)
        if words is None or list(command.words) == words[:len(command.words)]:
            options = load(command.options)
            add_options(sub, options)
            sub.set_defaults(target=command.target, options=options)
    return parser


def options_from(args: argparse.Namespace) -> Any:
    """The subcommand's options dataclass, filled from the parsed arguments."""
    given = vars(args)
    return args.options(**{f.name: given[f.name] for f in dataclasses.fields(args.options)})


def load(reference: str) -> Any:
    """What a "module:name" reference names, its module imported now (the only lazy imports)."""
    module_name, _, name = reference.partition(":")
    return getattr(importlib.import_module(module_name), name)


def target_function(target: str) -> Callable[..., Any]:
    """The function a subcommand's "module:function" target names."""
    return load(target)


def launched_main(command: str, argv: list[str] | None = None) -> int:
    """`python -m continual_pt.<module>` under a launcher: the arguments of one `cpt` subcommand, and
    the process's end (see `ended`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment instead.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    return ended(main([command, *argv]))


def program() -> NoReturn:
    """The `cpt` program (the console script, `python -m continual_pt.cli`): `main`, then the end."""
    sys.exit(ended(main()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    if args.cpt_command == "train":   # before the heavy imports: a stop during set-up is remembered, not fatal
        load("continual_pt.training.stop:process_request")()
    # What a library prints while it is imported (DeepSpeed: "Setting accelerator to CPU") goes to stderr,
    # and so does whatever its loggers, made then, print later: stdout is the command's own (--list, --status).
    with contextlib.redirect_stdout(sys.stderr):
        func = target_function(args.target)
    try:
        status = int(func(options_from(args)) or EXIT_OK)
    except UserError as exc:
        print(f"cpt {args.cpt_command}: error: {exc}", file=sys.stderr)
        status = EXIT_USAGE
    except OSError as exc:
        # A file the environment refused mid-way (remounted read-only, permissions, a full disk), said
        # like a UserError; any other OSError is a bug and keeps its traceback.
        fault = environment_fault(exc)
        if fault is None:
            raise
        print(f"cpt {args.cpt_command}: error: {fault}", file=sys.stderr)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        # Work in progress was left as each command promises (atomic outputs, committed checkpoints).
        print(f"cpt {args.cpt_command}: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    return status


def ended(status: int) -> int:
    """`status`, for a program about to exit with it; a process that joined a process group (a rank of
    cpt train or eval) ends here instead, without the interpreter's teardown (see
    `runtime.distributed.end_process`). Only the program's entries call it: `main` called in a
    process of the caller's (a notebook, a test) returns."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        load("continual_pt.runtime.distributed:end_process")(status)
    return status


if __name__ == "__main__":
    program()
