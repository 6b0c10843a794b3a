"""Temporary: bench/forgetting's old path to what now lives in `foundation.model` (issue #20).

bench/forgetting may not change while its recorded run is in progress. Once its imports read
`foundation.model`, delete this module. Nothing else may import it
(tests/unit/test_import_direction.py fails if anything does).
"""

from foundation.model import (
    CausalLM,
    load_model,
    load_tokenizer,
    model_identity,
    prepare_base_model,
)

__all__ = ["CausalLM", "load_model", "load_tokenizer", "model_identity", "prepare_base_model"]
