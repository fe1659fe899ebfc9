import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.datasets import data_root  # noqa: E402

SHARED = data_root()


@pytest.fixture(scope="session")
def synthetic_slice(tmp_path_factory):
    """A synthetic Space Ranger folder (the demo slice), made once per test session."""
    from data.synthetic import make_synthetic_visium
    return make_synthetic_visium(tmp_path_factory.mktemp("syn") / "slice", n_rows=24, n_cols=24, n_genes=300)


@pytest.fixture
def slice_copy(synthetic_slice, tmp_path):
    """A private, writable copy of the synthetic slice that a test may break."""
    import shutil
    dst = tmp_path / "slice"
    shutil.copytree(synthetic_slice, dst)
    return dst


def shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path
