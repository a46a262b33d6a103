"""The training loop, its objectives, validation, resume checkpoints and devices."""
