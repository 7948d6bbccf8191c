"""RefAlign node pack for ComfyUI (loaded by ComfyUI from this folder; relative imports only)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.runtime import install_example_images

WEB_DIRECTORY = "./web"
install_example_images()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
