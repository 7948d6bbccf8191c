"""RefAlign node pack for ComfyUI (loaded by ComfyUI from this folder; relative imports only). ComfyUI registers the
nodes through `comfy_entrypoint` (V3); importing the pack imports nothing of ComfyUI or of the nodes."""


async def comfy_entrypoint():
    from .nodes import RefAlignExtension

    return RefAlignExtension()
