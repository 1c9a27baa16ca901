"""Data: raw sources, tokenization, packed token shards with a manifest, and a resumable sampler."""
