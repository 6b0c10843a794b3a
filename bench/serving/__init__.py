"""Serving with many adapters: vLLM direct vs our API, hot swap, local (python -m bench.serving)."""
