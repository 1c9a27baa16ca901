"""Test-only probe, on PYTHONPATH of the elastic-resume and commit-protocol tests' training processes
(never imported by the package): with CPT_PROBE_DIR set it records, per rank, the windows each
micro-batch reads, and on rank 0 the full fp32 weights, Adam moments and LR right before a save and
right after a resume loads; with CPT_PROBE_RANK1_CWD set, rank 1 starts in that directory; with
CPT_PROBE_FULL_DISK=<rank>:<step>:<zip|legacy> set, that rank's disk is full for the checkpoint of that
step: each torch.save into its folder (DeepSpeed's files, the rank file) writes to /dev/full instead,
where the kernel answers ENOSPC (torch's zip writer then fails without an errno; "legacy" uses torch's
legacy format, whose write raises the OSError)."""

import os
import sys

if os.environ.get("CPT_PROBE_RANK1_CWD") and os.environ.get("RANK") == "1":
    os.chdir(os.environ["CPT_PROBE_RANK1_CWD"])   # a relative out_dir resolves elsewhere, as on another node

_full = os.environ.get("CPT_PROBE_FULL_DISK", "").split(":")
_training = "continual_pt.train" in getattr(sys, "orig_argv", sys.argv)
if len(_full) == 3 and os.environ.get("RANK") == _full[0] and _training:
    import torch

    _torch_save = torch.save

    def _save_on_full_disk(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.basename(os.path.dirname(f)) == f"global_step{_full[1]}":
            f = "/dev/full"
            if _full[2] == "legacy":
                kwargs["_use_new_zipfile_serialization"] = False
        return _torch_save(obj, f, *args, **kwargs)

    torch.save = _save_on_full_disk

# Only in training processes: a helper that Python subprocess (py-cpuinfo, which DeepSpeed's CPU Adam
# asks for the CPU's features) must keep its stdout to itself, which importing deepspeed here would not.
if os.environ.get("CPT_PROBE_DIR") and "continual_pt.train" in getattr(sys, "orig_argv", sys.argv):
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from continual_pt.checkpoint import checkpointer
    from continual_pt.data import sampler
    from continual_pt.training import session

    _dir = Path(os.environ["CPT_PROBE_DIR"])
    _tag = os.environ.get("CPT_PROBE_TAG", "run")

    def _rank() -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def _dump(engine, name: str) -> None:
        state = {"lr": engine.get_lr()[0]}
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        state["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):   # ZeRO 1/2: link the moments anew
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        for key, p in engine.module.named_parameters():
            state[key] = (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                          safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
        if _rank() == 0:
            torch.save(state, _dir / name)

    def _logged(next_batch):
        def logged(self):
            batch = next_batch(self)
            rows = [[int(s), int(w)] for s, w in zip(batch["source"], batch["window"])]
            with open(_dir / f"windows-{_tag}-rank{_rank()}.jsonl", "a") as f:
                f.write(json.dumps(rows) + "\n")
            return batch
        return logged

    # The windows the step consumes: where batches are read ahead, those handed to the step.
    try:
        from continual_pt.training import prefetch
        readers = [getattr(prefetch, name) for name in ("Prefetcher", "Synchronous")]
    except ImportError:
        readers = [sampler.MixtureSampler]
    for reader in readers:
        reader.next_batch = _logged(reader.next_batch)

    _save = checkpointer.Checkpointer.save

    def save(self, engine, step, *args, **kwargs):
        _dump(engine, f"saved-{_tag}-step{step}.pt")
        return _save(self, engine, step, *args, **kwargs)

    checkpointer.Checkpointer.save = save

    _restore = session.restore

    def restore(cfg, start, engine, *args, **kwargs):
        state = _restore(cfg, start, engine, *args, **kwargs)
        if start.kind == "resume":
            _dump(engine, f"loaded-{_tag}-step{state.step}.pt")
        return state

    session.restore = restore
