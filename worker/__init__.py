"""Background work: the training engine (`worker.training`) and the command-line entry point."""
