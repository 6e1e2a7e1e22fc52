import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _rho1_helpers import make_hf_reference, make_ours_reference  # noqa: E402


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory) -> Path:
    return make_hf_reference(tmp_path_factory.mktemp("hfref") / "model")


@pytest.fixture(scope="session")
def ours_reference(tmp_path_factory) -> Path:
    return make_ours_reference(tmp_path_factory.mktemp("ourref"))
