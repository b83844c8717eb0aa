"""Pieces shared by the command-line tools (no TensorFlow imported here)."""
