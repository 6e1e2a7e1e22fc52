import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "rho1"))

from _rho1_helpers import make_ours_reference  # noqa: E402


@pytest.fixture(scope="session")
def ours_reference(tmp_path_factory) -> Path:
    return make_ours_reference(tmp_path_factory.mktemp("mixref"))
