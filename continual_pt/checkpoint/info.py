"""`cpt checkpoint info` and `cpt checkpoint convert`: what a checkpoint holds before resuming it on
another allocation, and its universal conversion made ahead of time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from continual_pt import layout
from continual_pt.checkpoint import elastic, integrity, refs
from continual_pt.checkpoint.options import ConvertOptions, InfoOptions
from continual_pt.errors import UserError


def _tag_dirs(path: Path) -> tuple[list[Path], Path | None]:
    """(every checkpoint folder listed, the one shown in detail) for a tag, checkpoints or run dir."""
    if layout.step_of(path.name) is not None:
        return [path], path
    root = path / layout.CHECKPOINTS if (path / layout.CHECKPOINTS).is_dir() else path
    tags = refs.list_tags(root)
    if not tags:
        raise UserError(f"checkpoint info: no checkpoint folders ({layout.TAG_PREFIX}<N>) under {root}")
    committed = [p for p in tags if refs.is_committed(p)]
    return tags, (committed or tags)[-1]


def _state(tag_dir: Path) -> str:
    """committed, committed but damaged (why), or not committed."""
    if not refs.is_committed(tag_dir):
        return f"NOT committed (no {layout.MARKER}: an interrupted save, never resumed)"
    try:
        refs.verify(tag_dir, hint=False)
    except UserError as exc:
        return f"committed but damaged: {str(exc).removeprefix(f'checkpoint {tag_dir} ')}"
    return "committed, every file matches its size and checksum"


def _universal_line(tag_dir: Path) -> str:
    out = elastic.universal_path(tag_dir)
    if not out.exists():
        return "universal conversion: none (made on the first resume with another world size or ZeRO stage)"
    if elastic.usable(tag_dir) is None:
        return f"universal conversion: {out} is stale or damaged (the next elastic resume converts again)"
    return f"universal conversion: {out} (committed, reused by a resume with another world size or ZeRO stage)"


def _file_lines(tag_dir: Path, meta: dict[str, Any] | None) -> list[str]:
    names = list(meta["files"]) if meta else integrity.listed_files(tag_dir)
    sizes = {n: (tag_dir / n).stat().st_size if (tag_dir / n).is_file() else None for n in names}
    total = sum(s for s in sizes.values() if s is not None)
    lines = [f"files: {len(names)}, {total:,} bytes ({integrity.megabytes(total)})"]
    for name in sorted(names):
        size = sizes[name]
        lines.append(f"  {f'{size:,}' if size is not None else 'MISSING':>14}  {name}")
    return lines


def describe(tag_dir: Path) -> list[str]:
    """The lines `cpt checkpoint info` prints about one checkpoint folder."""
    meta = None
    if refs.is_committed(tag_dir):
        try:
            meta = refs.CheckpointRef(tag_dir).meta()
        except (OSError, ValueError):
            meta = None
    lines = [f"checkpoint {tag_dir}: {_state(tag_dir)}"]
    if meta:
        saved = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(meta["time"])) if "time" in meta else "?"
        lines.append(f"step {meta.get('step')}, tokens {meta.get('tokens_seen', '?')}, world size "
                     f"{meta.get('world_size', '?')}, ZeRO stage {meta.get('zero_stage', '?')}, precision "
                     f"{meta.get('precision', '?')}, saved {saved}")
        lines.append(_universal_line(tag_dir))
    else:
        lines.append(f"step {layout.step_of(tag_dir.name)} (from its name; no marker records the rest)")
    return lines + _file_lines(tag_dir, meta)


def run_info(options: InfoOptions) -> int:
    """`cpt checkpoint info PATH`."""
    path = Path(options.path)
    if not path.exists():
        raise UserError(f"checkpoint info: {path} does not exist")
    tags, shown = _tag_dirs(path)
    if len(tags) > 1:
        print(f"{len(tags)} checkpoint folders under {tags[0].parent}:")
        for tag in tags:
            print(f"  {tag.name}: {'committed' if refs.is_committed(tag) else 'NOT committed'}")
        print()
    print("\n".join(describe(shown)))
    return layout.EXIT_OK


def run_convert(options: ConvertOptions) -> int:
    """`cpt checkpoint convert PATH`: convert once, ahead of a resume on another world size or stage."""
    ref = refs.resolve(options.path)
    meta = ref.meta()
    if not meta.get("zero_stage"):
        raise UserError(f"checkpoint {ref.path} was saved with ZeRO stage {meta.get('zero_stage', 0)}: its "
                        "optimizer state is not partitioned, so it resumes on any world size as it is; the "
                        "universal format is for ZeRO 1-3")
    out = elastic.usable(ref.path)
    if out is not None:
        print(f"{ref.path} is already converted: {out}")
        return layout.EXIT_OK
    out = elastic.convert(ref.path)
    print(f"converted {ref.path} (step {ref.step}, {meta.get('world_size')} ranks, ZeRO {meta['zero_stage']}) "
          f"to {out}; a resume with another world size or ZeRO stage loads it")
    return layout.EXIT_OK
