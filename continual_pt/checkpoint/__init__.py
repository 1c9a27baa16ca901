"""Checkpoints: the commit protocol (save, find, verify, prune), branches, conversion to DeepSpeed's
universal format, weights outside the engine (init, export), and `cpt checkpoint info/convert`."""
