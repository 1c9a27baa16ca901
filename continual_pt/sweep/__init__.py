"""Sweeps: a grid file expanded into one resolved, validated run config per run (`cpt sweep`)."""
