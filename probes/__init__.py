"""Frozen-layer probes for eval.py: heads (protocols), engine (one-pass train/eval), resume, report."""
