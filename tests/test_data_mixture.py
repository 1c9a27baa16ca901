"""Training mixtures by domain: a source keeps or re-weights the domains of a dataset prepared with them,
each kept domain a source of its own over its documents end to end; proportions, the start-up
description, resumes of a changed mixture, and bad input named before anything is written."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import yaml

from continual_pt import config
from continual_pt.cli import main
from continual_pt.data.dataset import PackedSequences, PreparedDataset
from continual_pt.data.mixture import DomainView, Mixture, describe
from continual_pt.data.sampler import MixtureSampler
from continual_pt.errors import UserError
from tests import train_support as ts

SEQ = 16


@pytest.fixture(scope="module")
def mixed(world, tmp_path_factory):
    """Three domains over several shards (documents shuffled, so each domain is many ranges)."""
    return ts.make_mixed(tmp_path_factory.mktemp("mixed"), world, "--shard-tokens", "3000")


def test_a_domain_view_is_its_ranges_end_to_end_and_its_windows_never_mix_domains(mixed):
    ds = PreparedDataset(mixed, "train")
    assert len(ds.shards) > 3 and sorted(ds.domains) == ["both", "code", "prose"]
    owner = ds.token_domains(0, ds.num_tokens)
    rng = np.random.default_rng(0)
    for domain in ds.domains:
        ranges = ds.domain_ranges(domain)
        assert len(ranges) > 10
        stream = np.concatenate([ds.tokens(int(a), int(b)) for a, b in ranges])
        positions = np.concatenate([np.arange(a, b) for a, b in ranges])
        view = DomainView(ds, domain)
        assert view.num_tokens == len(stream) == ds.domain_tokens[domain]
        assert np.array_equal(view.tokens(0, view.num_tokens), stream)
        cuts = np.cumsum(ranges[:, 1] - ranges[:, 0])[:-1]
        starts = [*(cuts - 1), *cuts, *(cuts - 20), *rng.integers(0, view.num_tokens, 100)]
        for start in map(int, starts):     # slices ending at, starting at and running across range boundaries
            start = max(start, 0)
            for stop in (start, start + 1, start + 40, start + 300):
                stop = min(stop, view.num_tokens)
                assert np.array_equal(view.tokens(start, stop), stream[start:stop]), (domain, start, stop)
        sample = rng.integers(0, view.num_tokens, 50)
        assert [view.split_position(int(i)) for i in sample] == [int(positions[i]) for i in sample]
        assert view.shard_at(int(cuts[-1])) == ds.shard_at(int(positions[cuts[-1]]))
        with pytest.raises(IndexError):
            view.tokens(0, view.num_tokens + 1)
        packed = PackedSequences(view, SEQ)
        assert len(packed) == view.num_tokens // (SEQ + 1)
        crossing = 0
        for i in range(len(packed)):
            window = slice(i * (SEQ + 1), (i + 1) * (SEQ + 1))
            assert np.array_equal(packed[i], stream[window])
            assert set(owner[positions[window]]) == {ds.domains.index(domain)}
            crossing += bool(np.any(np.diff(positions[window]) != 1))
        assert crossing > 10   # windows do run across documents of the domain that are apart in the split


def test_a_corrupt_token_of_a_domain_is_named_by_its_place_in_the_split(mixed):
    ds = PreparedDataset(mixed, "train")
    view = DomainView(ds, "prose")
    packed = PackedSequences(view, SEQ)
    first = int(packed[3].max())
    view.vocab_size = first            # as if the shard held an id beyond the vocabulary there
    bad = 3 * (SEQ + 1) + int(np.argmax(packed.dataset.tokens(3 * (SEQ + 1), 4 * (SEQ + 1)) >= first))
    with pytest.raises(UserError) as info:
        packed[3]
    assert (f"token {view.split_position(bad)} of split 'train', token {bad} of its domain 'prose'"
            in str(info.value)), str(info.value)
    assert str(view.shard_at(bad)) in str(info.value)


def sub_sampler(world, mixed, domains, weight=3.0, seed=7):
    mixture = Mixture()
    mixture.add("code", PreparedDataset(world["code"]), 1.0, SEQ)
    mixture.add("mixed", PreparedDataset(mixed), weight, SEQ, domains, "data.train.mixed")
    return mixture, MixtureSampler(mixture.sources, mixture.weights, seed, 4)


@pytest.mark.parametrize("domains", [{"code": 2.0, "prose": 1.0}, ["code", "prose"]], ids=["weighted", "natural"])
def test_a_domain_mixture_hits_its_proportions_over_1000_batches(world, mixed, domains):
    ds = PreparedDataset(mixed)
    mixture, sampler = sub_sampler(world, mixed, domains)
    inner = domains if isinstance(domains, dict) else {d: ds.domain_tokens[d] for d in domains}
    shares = {"code": 0.25, **{f"mixed/{d}": 0.75 * w / sum(inner.values()) for d, w in inner.items()}}
    assert sampler.names == sorted(shares) and sampler.weights == pytest.approx(shares, rel=1e-12)
    owner = ds.token_domains(0, ds.num_tokens)
    counts = Counter()
    for b in range(1, 1001):
        batch = sampler.next_batch()
        counts.update(sampler.names[int(i)] for i in batch["source"])
        # Tolerance: every source's running count stays within one sequence of its share, at every batch.
        assert all(abs(counts[n] - share * 4 * b) < 1 for n, share in shares.items()), (b, counts)
        for s, w in zip(batch["source"].tolist(), batch["window"].tolist()):
            name = sampler.names[s]
            if name.startswith("mixed/") and b % 50 == 0:   # a row's tokens all come from its domain
                view = mixture.sources[name].dataset
                at = [view.split_position(w * (SEQ + 1) + j) for j in range(SEQ + 1)]
                assert set(owner[at]) == {ds.domains.index(name.partition("/")[2])}
    assert sum(counts.values()) == 4000 and "mixed/both" not in counts
    lines = describe(mixture, 4000).splitlines()
    assert lines[0] == "data mixture (each source's share of the training sequences):"
    for line, name in zip(lines[1:], sorted(shares)):
        packed = mixture.sources[name]
        assert line.split() == [name, f"{shares[name]:.2%}", f"{packed.dataset.num_tokens:,}", "tokens,",
                                f"{shares[name] * 4000 / len(packed):.3g}", "epochs", "this", "phase"]
    assert mixture.sources["mixed/prose"].dataset.num_tokens == ds.domain_tokens["prose"]


def test_a_resume_with_a_changed_domain_mixture_is_refused_as_a_changed_mixture(world, mixed):
    _, first = sub_sampler(world, mixed, {"code": 2.0, "prose": 1.0})
    for _ in range(5):
        first.next_batch()
    state = copy.deepcopy(first.state_dict())
    assert set(state["sources"]) == {"code", "mixed/code", "mixed/prose"}
    _, again = sub_sampler(world, mixed, {"code": 2.0, "prose": 1.0})
    again.load_state_dict(copy.deepcopy(state))
    for _ in range(3):   # the same mixture continues at the next sequence
        a, b = first.next_batch(), again.next_batch()
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["source"], b["source"])
    for domains, match in [({"code": 1.0, "prose": 1.0}, "weight .* differs from the checkpoint's"),
                           (["code", "prose"], "weight .* differs from the checkpoint's"),
                           ({"code": 2.0}, "differ from the config's"),
                           ({"code": 2.0, "prose": 1.0, "both": 1.0}, "differ from the config's")]:
        _, changed = sub_sampler(world, mixed, domains)
        with pytest.raises(UserError, match=f"{match}.*start a new phase to change the mixture"):
            changed.load_state_dict(copy.deepcopy(state))
    # The same source without domains is another mixture too (its one source has the source's name).
    plain = MixtureSampler({"code": PackedSequences(PreparedDataset(world["code"]), SEQ),
                            "mixed": PackedSequences(PreparedDataset(mixed), SEQ)}, {"code": 1.0, "mixed": 3.0}, 7, 4)
    with pytest.raises(UserError, match="differ from the config's"):
        plain.load_state_dict(copy.deepcopy(state))


def run_config(tmp_path, world, mixed, **data):
    path = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="bad", eval={"sets": {}},
                           data={"train": {"code": {"path": str(world["code"])},
                                           "mixed": {"path": str(mixed), "weight": 3.0, **data}}, "seq_len": SEQ})
    return path


@pytest.mark.parametrize("domains, overrides, key, message", [
    ({"code": 0.0, "prose": 1.0}, [], "data.train.mixed.domains.code", "must be > 0, got 0.0"),
    ({"code": 1.0}, ["data.train.mixed.domains.prose=-2"], "data.train.mixed.domains.prose", "must be > 0, got -2.0"),
    ([], [], "data.train.mixed.domains", "empty: name the domains to keep, or leave domains out"),
    ({}, [], "data.train.mixed.domains", "empty: name the domains to keep"),
    (["code", "code"], [], "data.train.mixed.domains", "lists 'code' twice"),
    ("code", [], "data.train.mixed.domains", "expected a mapping or a list, got 'code'"),
], ids=["zero", "negative-override", "empty-list", "empty-mapping", "twice", "a-string"])
def test_a_bad_domains_value_is_named_by_its_key_with_exit_2(world, mixed, tmp_path, capsys, domains, overrides,
                                                            key, message):
    path = run_config(tmp_path, world, mixed, domains=domains)
    assert main(["train", "--config", str(path), *overrides]) == 2
    origin = "command line" if overrides else str(path)
    assert f"{origin}: {key}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_domains_the_dataset_lacks_are_named_at_once_before_anything_is_written(world, mixed, tmp_path):
    from continual_pt.training.session import open_datasets

    ds = PreparedDataset(mixed)
    path = run_config(tmp_path, world, mixed, domains={"code": 1.0, "Prose": 2.0})
    with pytest.raises(UserError) as info:
        open_datasets(config.load(path, ["data.train.mixed.domains.cod=1", "data.train.code.domains=[code]"]))
    assert info.value.problems == [
        f"command line: data.train.code.domains: {world['code']} has no domains (prepared without --domain-field "
        "or --layout): prepare it again with --domain-field FIELD, or leave domains out to train on the whole "
        "dataset",
        f"{path}: data.train.mixed.domains.Prose: {mixed} has no domain 'Prose' (its domains: "
        f"{', '.join(ds.domains)})",
        f"command line: data.train.mixed.domains.cod: {mixed} has no domain 'cod' (its domains: "
        f"{', '.join(ds.domains)})"]
    both = ds.domain_tokens["both"]
    with pytest.raises(UserError, match=f"command line: data.train.mixed.domains: domain 'both' has {both} tokens in split "
                                        f"'train' of {mixed}, fewer than one sequence of data.seq_len \\+ 1 = "
                                        f"{both + 1}: leave it out"):
        open_datasets(config.load(path, ["data.train.mixed.domains=[code, both]", f"data.seq_len={both}"]))
    train, _, _ = open_datasets(config.load(path, ["data.train.mixed.domains=[code, both]"]))
    assert sorted(train.sources) == ["code", "mixed/both", "mixed/code"]
    assert yaml.safe_load(config.dump(config.load(path)))["data"]["train"]["mixed"]["domains"] == \
        {"code": 1.0, "Prose": 2.0}
