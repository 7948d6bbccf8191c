"""Offline checks for UI-format (schema 0.4) workflows and their conversion to the API prompt format.

Node signatures: ours come from the pack's INPUT_TYPES; the few core nodes the workflows use are described in
CORE_NODES (names, types and order as ComfyUI 0.3.64's /object_info reports them)."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
ANY = object()  # a combo whose options depend on the user's files

# node type -> (inputs in order: (name, type, options), outputs)
CORE_NODES = {
    "LoadImage": ([("image", "COMBO", {"options": ANY}), ("upload", "IMAGEUPLOAD", {})], ["IMAGE", "MASK"]),
    "CreateVideo": ([("images", "IMAGE", {}), ("fps", "FLOAT", {"min": 1.0, "max": 120.0}),
                     ("audio", "AUDIO", {"optional": True})], ["VIDEO"]),
    "SaveVideo": ([("video", "VIDEO", {}), ("filename_prefix", "STRING", {}),
                   ("format", "COMBO", {"options": ["auto", "mp4"]}), ("codec", "COMBO", {"options": ["auto", "h264"]})],
                  []),
    "SaveAnimatedWEBP": ([("images", "IMAGE", {}), ("filename_prefix", "STRING", {}),
                          ("fps", "FLOAT", {"min": 0.01, "max": 1000.0}), ("lossless", "BOOLEAN", {}),
                          ("quality", "INT", {"min": 0, "max": 100}),
                          ("method", "COMBO", {"options": ["default", "fastest", "slowest"]})], []),
    "PreviewImage": ([("images", "IMAGE", {})], []),
    "CLIPLoader": ([("clip_name", "COMBO", {"options": ANY}), ("type", "COMBO", {"options": ANY}),
                    ("device", "COMBO", {"options": ["default", "cpu"], "optional": True})], ["CLIP"]),
    "CLIPTextEncode": ([("text", "STRING", {}), ("clip", "CLIP", {})], ["CONDITIONING"]),
    "VAELoader": ([("vae_name", "COMBO", {"options": ANY})], ["VAE"]),
}
UI_ONLY = {"Note": 1, "MarkdownNote": 1}  # frontend-only nodes: one text widget, never sent to the server


def pack_signatures(pack) -> dict:
    out = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for name, (kind, options) in spec.get(section, {}).items():
                if isinstance(kind, list):
                    kind, options = "COMBO", dict(options, options=ANY if name == "model_name" else kind)
                inputs.append((name, kind, dict(options, optional=section == "optional")))
        out[node_id] = (inputs, list(cls.RETURN_TYPES))
    return out


def widget_slots(inputs) -> list[tuple[str, str, dict]]:
    """The serialisable widgets in the frontend's order; a seed-like INT takes an extra control value after it."""
    slots = []
    for name, kind, options in inputs:
        if kind == "IMAGEUPLOAD":
            slots.append((name, "UPLOAD", options))
        elif kind in WIDGET_TYPES and not options.get("forceInput"):
            slots.append((name, kind, options))
            if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
                slots.append((name + ":control", "CONTROL", {}))
    return slots


def check_value(kind, options, value) -> str | None:
    if kind == "CONTROL":
        return None if value in ("fixed", "increment", "decrement", "randomize") else f"bad control value {value!r}"
    if kind == "UPLOAD":
        return None if value == "image" else f"bad upload value {value!r}"
    if kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{value!r} is not an INT"
    if kind == "FLOAT" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return f"{value!r} is not a FLOAT"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            return f"{value} outside [{options.get('min')}, {options.get('max')}]"
        step = options.get("step")
        if kind == "INT" and step and step > 1 and (value - options.get("min", 0)) % step:
            return f"{value} is off the widget's step {step} (from {options.get('min', 0)})"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if kind == "COMBO" and options.get("options") is not ANY and value not in options.get("options", []):
        return f"{value!r} is not one of {options.get('options')}"
    return None


def validate(workflow: dict, signatures: dict) -> list[str]:
    """All problems found (empty = valid): zod 0.4 structure, node types, widgets, links, ids."""
    errors = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            errors.append(f"missing top-level '{key}'")
    if workflow.get("version") != 0.4:
        errors.append(f"version must be 0.4, got {workflow.get('version')!r}")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        errors.append("duplicate node ids")
    if nodes and max(nodes) > workflow.get("last_node_id", 0):
        errors.append("last_node_id is smaller than a node id")
    links = {}
    for link in workflow.get("links", []):
        if not isinstance(link, list) or len(link) != 6:
            errors.append(f"link {link} is not a 6-tuple")
            continue
        links[link[0]] = link
    if len(links) != len(workflow.get("links", [])):
        errors.append("duplicate link ids")
    if links and max(links) > workflow.get("last_link_id", 0):
        errors.append("last_link_id is smaller than a link id")
    for node in nodes.values():
        where = f"node {node.get('id')} ({node.get('type')})"
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            if key not in node:
                errors.append(f"{where}: missing '{key}'")
        if node["type"] in UI_ONLY:
            if len(node.get("widgets_values", [])) != UI_ONLY[node["type"]]:
                errors.append(f"{where}: a note holds one text")
            continue
        if node["type"] not in signatures:
            errors.append(f"{where}: unknown node type")
            continue
        inputs, outputs = signatures[node["type"]]
        slots = widget_slots(inputs)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"{where}: {len(values)} widget values, expected {len(slots)} ({[s[0] for s in slots]})")
        for (name, kind, options), value in zip(slots, values):
            problem = check_value(kind, options, value)
            if problem:
                errors.append(f"{where}: widget {name}: {problem}")
        sockets = {name: kind for name, kind, _ in inputs if kind not in WIDGET_TYPES and kind != "IMAGEUPLOAD"}
        for index, entry in enumerate(node.get("inputs", [])):
            if entry["name"] not in sockets or sockets[entry["name"]] != entry["type"]:
                errors.append(f"{where}: input {entry['name']}:{entry['type']} is not in the node's signature")
            if entry.get("link") is not None:
                link = links.get(entry["link"])
                if link is None or link[3] != node["id"] or link[4] != index:
                    errors.append(f"{where}: input {entry['name']} points at link {entry['link']} that does not end here")
        for slot, entry in enumerate(node.get("outputs", [])):
            if slot >= len(outputs) or entry["type"] != outputs[slot]:
                errors.append(f"{where}: output {slot} {entry['type']} does not match {outputs}")
            for link_id in entry.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    errors.append(f"{where}: output {slot} lists link {link_id} that does not start here")
        required = [name for name, kind, o in inputs if name in sockets and not o.get("optional")]
        connected = {e["name"] for e in node.get("inputs", []) if e.get("link") is not None}
        for name in required:
            if name not in connected:
                errors.append(f"{where}: required input {name} is not connected")
    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: missing end node")
            continue
        out_type = nodes[src]["outputs"][src_slot]["type"] if src_slot < len(nodes[src]["outputs"]) else None
        in_entry = nodes[dst]["inputs"][dst_slot] if dst_slot < len(nodes[dst]["inputs"]) else None
        if out_type != kind or in_entry is None or in_entry["type"] != kind or in_entry.get("link") != link_id:
            errors.append(f"link {link_id}: types or ends disagree ({out_type} -> {in_entry}, link says {kind})")
    return errors


def to_api_prompt(workflow: dict, signatures: dict) -> dict:
    """UI workflow -> API prompt, as the frontend's graphToPrompt does: widgets by name (control values dropped),
    links as [source id, slot], UI-only and muted / bypassed nodes left out."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs, _ = signatures[node["type"]]
        values = {}
        for (name, kind, _), value in zip(widget_slots(inputs), node.get("widgets_values", [])):
            if kind == "CONTROL":
                continue
            values["upload" if kind == "UPLOAD" else name] = value
        values.pop("upload", None)
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                values[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": values,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
