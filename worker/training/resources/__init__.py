"""Data files shipped with the training engine (general_mc.jsonl)."""
