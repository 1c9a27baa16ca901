"""Shared pytest fixtures (data fixtures are prefixed `data_`), and how the suite is spread over its
two xdist workers (pyproject.toml's addopts: `-n 2 --no-loadscope-reorder`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests import train_support as ts

# One SLURM cluster per session: a fixture imported into two modules would be two session fixtures,
# the second waiting on the first's lock.
from tests.slurm_cluster import slurm_fixture  # noqa: F401  (the fixture `slurm`)

# A module's tests run on one worker, so its module fixtures (reference runs) are built once; the
# modules that use the SLURM cluster or the loopback sshd share one worker each, as they share the
# daemons. Groups start longest first, so that no worker is left alone with a long one at the end.
# (xdist's own `--dist loadgroup` marks groups in the node ids, which pytest 9.2 no longer lets it do.)
SHARED_DAEMONS = {"test_slurm": "slurm", "test_sweep_submit": "slurm", "test_eval_array": "slurm",
                  "test_prepare_array": "slurm", "test_multinode": "sshd"}
LONGEST_FIRST = ("test_train_resume", "test_elastic", "test_launchers", "slurm", "test_demo", "test_demo_own", "test_startup_ops",
                 "test_train_start", "sshd", "test_train_safety", "test_commit_protocol", "test_sweep_local",
                 "test_shm_buffers", "test_host_malloc", "test_evaluate", "test_checkpoint_runs")


def work_group(nodeid: str) -> str:
    """The group of a test: its module's name, or the daemons the module shares with others."""
    module = nodeid.split("::")[0].rpartition("/")[2].removesuffix(".py")
    return SHARED_DAEMONS.get(module, module)


class ModuleGroups(LoadScopeScheduling):
    """xdist's scope scheduling (a group runs on one worker, whole) with the groups above."""

    def _split_scope(self, nodeid: str) -> str:
        return work_group(nodeid)


def pytest_xdist_make_scheduler(config, log):
    return ModuleGroups(config, log)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (order.get(work_group(item.nodeid), len(order)), position[id(item)]))


_WORDS = ("the", "model", "forgets", "re-warming", "learning", "rate", "λόγος", "naïve", "数据", "🙂",
          "<|endoftext|>", "    ", "\n", "\n\n", "\t", "x = f(1);", "Ünïcödé", "tokens", "of", "a", "corpus")


def make_docs(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    """n distinct documents mixing ASCII, non-Latin scripts, emoji, whitespace runs and a literal EOS string."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, max_words))]
        docs.append(f"document {seed}-{i}: " + " ".join(words))
    return docs


@pytest.fixture(scope="session")
def data_docs():
    """The document generator: data_docs(n, seed=0) -> list[str]."""
    return make_docs


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory) -> Path:
    """A small byte-level BPE trained by `cpt tokenizer train` (EOS `<|endoftext|>` = 0)."""
    from continual_pt.data.tokenizer import EOS_TOKEN, LoadedTokenizer, train_bpe

    out = tmp_path_factory.mktemp("data_tokenizer") / "tok"
    tok = train_bpe(make_docs(400, seed=99), vocab_size=400)
    LoadedTokenizer(name="test", tokenizer_json=tok.to_str(), sha256="", eos_token=EOS_TOKEN, eos_id=0,
                    vocab_size=tok.get_vocab_size(True)).copy_to(out)
    return out


@pytest.fixture(scope="session")
def data_dataset(tmp_path_factory, data_tokenizer) -> Path:
    """A prepared dataset of ~600 documents (train and val), several shards per split."""
    import json

    from continual_pt.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("data_dataset")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(600, seed=1)), encoding="utf-8")
    prepare(PrepareOptions(sources=[str(src)], tokenizer=str(data_tokenizer), out=str(root / "ds"),
                           val_fraction=0.1, shard_tokens=5000, workers=1, quiet=True))
    return root / "ds"


def _fingerprint(paths: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under the world's folders."""
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns)
            for root in paths.values() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A trained BPE tokenizer and two prepared datasets ('code', 'prose'), built once per session.

    Shared by every module, so it is read-only: a test that writes into it fails at the session's end.
    """
    paths = ts.make_world(tmp_path_factory.mktemp("world"))
    before = _fingerprint(paths)
    yield paths
    assert _fingerprint(paths) == before, "a test wrote into the shared world: give that test its own copy"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spinning against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

