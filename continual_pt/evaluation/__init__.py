"""`cpt eval`: scoring checkpoints on named held-out sets into a results store."""
