"""The shared training engine: `prepare.prepare(spec)` builds a run, `train.run(prep, ...)` trains it."""
