"""Shared test setup: the ViT/ code is imported as top-level modules (`import models_mim`)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / 'ViT') not in sys.path:
    sys.path.insert(0, str(ROOT / 'ViT'))


@pytest.fixture
def root() -> Path:
    return ROOT
