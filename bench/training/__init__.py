"""Training throughput: our DPO and BAPO modes vs TRL's DPOTrainer (python -m bench.training)."""
