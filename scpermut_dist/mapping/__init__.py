"""Checkpoints and query mapping: everything a server needs to load a reference and predict, never train."""
