import pytest
from tiny_models import tiny_dit, tiny_vae, write_tiny_text_encoder


@pytest.fixture
def dit():
    return tiny_dit(seed=0)


@pytest.fixture(scope="session")
def vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("umt5"))
