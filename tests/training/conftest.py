"""The training tests' shared toy data."""

import pytest

from refalign_core.toy.world import make_toy_world
from train_runs import config, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The toy world and its feature cache, built once per test file that uses it."""
    folder = tmp_path_factory.mktemp("toy_data")
    manifest = make_toy_world(folder / "world", num_videos=8, size=64, frames=17)
    info = {"manifest": manifest, "cache": folder / "cache"}
    run(["--config", config(folder, info), "--output-dir", folder / "cache_run", "--cache-only"])
    return info
