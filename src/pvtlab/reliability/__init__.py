"""Reliability: atomic checkpoints, exact mid-epoch resume, a guard against non-finite losses."""
