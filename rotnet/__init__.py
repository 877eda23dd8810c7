"""Shared building blocks of the rotnet trainer: config, distributed init, checkpoints, logging."""
