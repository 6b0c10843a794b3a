"""Data files shipped with the training engine: general_mc.jsonl (the retention gate's
multiple-choice questions) and general_prompts.jsonl (the gate's general prompts, judged for
degenerate answers)."""
