"""The shared training engine: one `train(spec)` path for every method."""
