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


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory):
    """The bad-input tables' shared input files (`bad_input.make_inputs`), made once."""
    from bad_input import make_inputs

    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))
