"""Errors a user can cause and fix: the `cpt` command prints them as one message and exits 2."""


class UserError(Exception):
    """Bad input (a missing file, a corrupt shard, a mismatched tokenizer), named precisely."""
