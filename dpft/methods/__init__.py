"""DP fine-tuning methods. Each module registers a `Method` subclass (see `base.py`)."""

from dpft.methods.base import Method, NonPrivate, PrivacyParams, build_method, register

__all__ = ["Method", "NonPrivate", "PrivacyParams", "build_method", "register"]
