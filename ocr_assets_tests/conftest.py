"""Shared fixtures: small generated datasets, written once per test session."""

from __future__ import annotations

import pytest

from ocr_assets.sample import write_sample


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    """Four sample pages (PNG and JPEG) in two save_to_disk shards."""
    return str(write_sample(tmp_path_factory.mktemp("small") / "dataset", pages=4, shards=2))


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> str:
    """The full default sample dataset, as `ocr-assets run` uses it."""
    return str(write_sample(tmp_path_factory.mktemp("sample") / "dataset"))
