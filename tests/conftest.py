import os
from pathlib import Path

import pytest

os.environ.setdefault("LMFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "lmforge" / "sample"
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture
def shared_corpus() -> Path:
    """../shared/corpus (present in development and CI checkouts); tests that need it skip without it."""
    if not SHARED_CORPUS.is_dir():
        pytest.skip("../shared/corpus not present")
    return SHARED_CORPUS
