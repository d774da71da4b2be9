"""Helpers for tests, ours and users': a fault proxy that cuts and stalls connections on cue."""
