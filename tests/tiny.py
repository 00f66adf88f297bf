"""Tiny random-weight targets and heads for fast unit tests (they live in the package, so that
the load test can use them too)."""

from aerie.tiny import VOCAB, build_tiny_model, tiny_head, tiny_llama, tiny_target

__all__ = ["VOCAB", "build_tiny_model", "tiny_head", "tiny_llama", "tiny_target"]
