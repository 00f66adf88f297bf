"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from aerie.models import resolve_model


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The real demo target as a Hugging Face directory (fetched and converted once per machine)."""
    return resolve_model(None)
