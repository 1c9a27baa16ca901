"""Pieces that training and evaluation share: the model, process groups, checkpoints, scoring."""
