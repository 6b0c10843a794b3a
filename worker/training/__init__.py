"""BAPO training engine: base anchors, reference log-probs, LoRA training, evaluation.

No Celery, web or database imports here: the job runner and the `bapo` CLI call into it.
Modules import torch lazily where they can, so importing the package stays cheap.
"""
