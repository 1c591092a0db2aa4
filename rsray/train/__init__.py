"""Training: the per-worker core (`loop`) in plain PyTorch, wrapped by Ray Train in `run`."""
