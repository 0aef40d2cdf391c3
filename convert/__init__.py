"""The PyTorch bridge: reading pickled checkpoints safely and converting them (needs torch)."""
