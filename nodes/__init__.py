"""ComfyUI nodes (RefAlign Loader, Multi-Subject Reference, R2V Sampler, Identity Check) — thin adapters from
ComfyUI types to `refalign_core`. ComfyUI imports stay inside this package and are lazy."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
