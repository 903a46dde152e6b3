"""Training: reference preparation, the split, the one training loop, and its Ray Train worker wrapper."""
