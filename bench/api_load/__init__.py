"""Feedback ingestion under wrk load vs /healthz, rows counted after (python -m bench.api_load)."""
