"""A stand-in for the part of ComfyUI's V3 node API (`comfy_api.latest`: `io`, `ComfyExtension`) that the nodes use,
so they are defined and run without ComfyUI. It keeps what a schema declares; `tools/comfyui_parity.py` and the real
server check the same nodes against the real API."""

import sys
import types


class Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, description="",
                 is_output_node=False):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs = list(inputs or []), list(outputs or [])
        self.description, self.is_output_node = description, is_output_node


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        return cls.define_schema()


class ComfyExtension:
    async def on_load(self) -> None:
        pass


class _Input:
    def __init__(self, io_type, id, optional=False, tooltip=None, options=None, **settings):
        self.io_type, self.id, self.optional, self.tooltip = io_type, id, optional, tooltip
        self.options = list(options) if options is not None else None
        self.settings = settings  # default, min, max, step, control_after_generate, multiline, …


class _Output:
    def __init__(self, io_type, id=None, display_name=None, tooltip=None):
        self.io_type, self.id, self.display_name, self.tooltip = io_type, id, display_name, tooltip


def _comfy_type(io_type: str):
    return type(io_type, (), {
        "io_type": io_type,
        "Input": staticmethod(lambda id, **kw: _Input(io_type, id, **kw)),
        "Output": staticmethod(lambda id=None, **kw: _Output(io_type, id, **kw)),
    })


io = types.ModuleType("comfy_api.latest.io")
io.Schema, io.NodeOutput, io.ComfyNode = Schema, NodeOutput, ComfyNode
io.Custom = _comfy_type
for _name, _io_type in {"Int": "INT", "Float": "FLOAT", "Boolean": "BOOLEAN", "String": "STRING", "Combo": "COMBO",
                        "Image": "IMAGE", "Mask": "MASK", "Model": "MODEL", "Clip": "CLIP", "Vae": "VAE",
                        "Conditioning": "CONDITIONING", "Latent": "LATENT", "Guider": "GUIDER",
                        "ClipVision": "CLIP_VISION"}.items():
    setattr(io, _name, _comfy_type(_io_type))


def install() -> None:
    """Register the stand-in as `comfy_api.latest` unless a real ComfyUI is importable."""
    if "comfy_api.latest" in sys.modules:
        return
    package, latest = types.ModuleType("comfy_api"), types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    package.latest = latest
    sys.modules.update({"comfy_api": package, "comfy_api.latest": latest, "comfy_api.latest.io": io})
