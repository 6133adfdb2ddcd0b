"""dpft: differentially private fine-tuning experiments on one shared engine."""

__version__ = "0.1.0"
