"""Data: raw sources, tokenization, packed token shards with a manifest, and a resumable sampler."""

DEFAULT_VAL_FRACTION = 0.005
"""Share of documents `cpt prepare` holds out for validation by default."""
DEFAULT_SHARD_TOKENS = 1 << 28
"""Tokens per shard file written by `cpt prepare` by default."""
