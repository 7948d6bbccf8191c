import os

import pytest
import torch

from tiny_models import tiny_dit, tiny_vae, write_tiny_text_encoder

if os.environ.get("PYTEST_XDIST_WORKER"):  # the cores are shared among the workers (pytest-xdist, `-n auto`)
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # and the commands a test runs



@pytest.fixture
def dit():
    return tiny_dit(seed=0)


@pytest.fixture(scope="session")
def vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory):
    """The bad-input tables' shared input files (`bad_input.make_inputs`), made once."""
    from bad_input import make_inputs

    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))
