"""Forgetting benchmark (issue 10): does BAPO personalize like DPO while forgetting less?

Run `python -m bench.forgetting [--quick]`; see bench/forgetting/benchmark.py for the flow.
"""
