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


# For a child process's code whose stderr a test reads: zarr imported with its import-time warnings kept aside
# (numcodecs >= 0.16.4 beside the crc32c package, as at zarr 3.0.8, the lower bound, warns of crc32c on import
# through a filter of its own that -W cannot override)
ZARR_IMPORTED_QUIETLY = "import warnings\nwith warnings.catch_warnings(record=True):\n    import zarr\n"
