"""Session fixtures for pipeline tests."""
import pytest

from tests.pipelines.images import make_folder


@pytest.fixture(scope="session")
def square_split(tmp_path_factory):
    """3 classes x 5 textured 40x40 JPEGs (names with spaces and unicode)."""
    return make_folder(tmp_path_factory.mktemp("square") / "train", [5, 5, 5])
