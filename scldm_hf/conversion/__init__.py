"""Conversion of checkpoints from other implementations (imported by the CLI only)."""
