"""Checkpoints: the on-disk format (files), the manager over stateful parts and its layouts, and
model rebuilding.

Lives below `train/` so that tools, interop, rl and serve read checkpoints without importing the
trainer package.
"""
