"""Inspect a model: what is large (size, FLOPs, memory) and what it attends to."""
