"""The toy world and the embedded default model: a synthetic multi-subject world (`world.py`), its small video
autoencoder (`vae.py`), tiny random model builders for tests and demos (`tiny.py`), the demo (`demo.py`) and the
shipped bundles (`models/`). Nothing in the inference path imports this package; a toy VAE file is loaded by its
class name through `refalign_core.vae`'s allowlist."""
