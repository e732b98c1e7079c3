"""Leaf utilities every layer may use: atomic writes and output folders, byte units, Results, statistics,
provenance, registries, the strict config base. Nothing here imports anything of pocketlm above `core`."""
