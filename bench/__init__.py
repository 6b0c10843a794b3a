"""Benchmarks of the training engine on the bundled model (run as `python -m bench.<name>`)."""
