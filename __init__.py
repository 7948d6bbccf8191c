"""RefAlign node pack for ComfyUI (loaded by ComfyUI from this folder). ComfyUI registers the nodes through
`comfy_entrypoint` (V3); importing the pack imports nothing of ComfyUI, of the nodes or of torch."""


def _use_this_core() -> None:
    """Make `import refalign_core` find this folder's core, as the nodes import it absolutely: the pack, the CLI, the
    API and the tests then share one copy (and one `RefAlignInputError`). Nothing else of this folder goes on
    `sys.path`, so its `train/` or `tools/` shadow nothing."""
    import importlib.util
    import logging
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent / "refalign_core"
    loaded = sys.modules.get("refalign_core")
    if loaded is not None:
        if Path(loaded.__file__).resolve().parent != folder:
            logging.getLogger(__name__).warning("RefAlign: refalign_core was already imported from %s; the nodes "
                                                "use that copy, not %s", loaded.__file__, folder)
        return
    spec = importlib.util.spec_from_file_location("refalign_core", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["refalign_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["refalign_core"]
        raise


async def comfy_entrypoint():
    _use_this_core()
    from .nodes import RefAlignExtension

    return RefAlignExtension()
