"""Offline checks for UI-format (schema 0.4) workflows and their conversion to the API prompt format.

Node signatures: ours come from the nodes' V3 schemas (`schema_signatures`); the few core nodes the workflows use are
described in CORE_NODES (names, types and order as ComfyUI 0.3.64's /object_info reports them). Against a running
ComfyUI, `object_info_signatures` reads all of them from the server (`comfyui_workflows.py`)."""

import re

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
    "PreviewAny": ([("source", "*", {})], []),
    "CLIPLoader": ([("clip_name", "COMBO", {"options": ANY}), ("type", "COMBO", {"options": ANY}),
                    ("device", "COMBO", {"options": ["default", "cpu"], "optional": True})], ["CLIP"]),
    "CLIPTextEncode": ([("text", "STRING", {}), ("clip", "CLIP", {})], ["CONDITIONING"]),
    "VAELoader": ([("vae_name", "COMBO", {"options": ANY})], ["VAE"]),
    "VAEDecode": ([("samples", "LATENT", {}), ("vae", "VAE", {})], ["IMAGE"]),
    "UNETLoader": ([("unet_name", "COMBO", {"options": ANY}),
                    ("weight_dtype", "COMBO", {"options": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]})],
                   ["MODEL"]),
    "LoraLoaderModelOnly": ([("model", "MODEL", {}), ("lora_name", "COMBO", {"options": ANY}),
                             ("strength_model", "FLOAT", {"min": -100.0, "max": 100.0})], ["MODEL"]),
    "ModelSamplingSD3": ([("model", "MODEL", {}), ("shift", "FLOAT", {"min": 0.0, "max": 100.0})], ["MODEL"]),
    "DualCFGGuider": ([("model", "MODEL", {}), ("cond1", "CONDITIONING", {}), ("cond2", "CONDITIONING", {}),
                       ("negative", "CONDITIONING", {}), ("cfg_conds", "FLOAT", {"min": 0.0, "max": 100.0}),
                       ("cfg_cond2_negative", "FLOAT", {"min": 0.0, "max": 100.0}),
                       ("style", "COMBO", {"options": ["regular", "nested"]})], ["GUIDER"]),
    "KSamplerSelect": ([("sampler_name", "COMBO", {"options": ANY})], ["SAMPLER"]),
    "BasicScheduler": ([("model", "MODEL", {}), ("scheduler", "COMBO", {"options": ANY}),
                        ("steps", "INT", {"min": 1, "max": 10000}), ("denoise", "FLOAT", {"min": 0.0, "max": 1.0})],
                       ["SIGMAS"]),
    "RandomNoise": ([("noise_seed", "INT", {"min": 0, "max": 18446744073709551615, "control_after_generate": True})],
                    ["NOISE"]),
    "SamplerCustomAdvanced": ([("noise", "NOISE", {}), ("guider", "GUIDER", {}), ("sampler", "SAMPLER", {}),
                               ("sigmas", "SIGMAS", {}), ("latent_image", "LATENT", {})], ["LATENT", "LATENT"]),
}
UI_ONLY = {"Note": 1, "MarkdownNote": 1}  # frontend-only nodes: one text widget, never sent to the server


def schema_signatures(nodes: dict) -> dict:
    """Signatures of V3 node classes (`{node_id: class}`) from their schemas, in the CORE_NODES form."""
    out = {}
    for node_id, cls in nodes.items():
        schema = cls.GET_SCHEMA()
        inputs = []
        for entry in schema.inputs:
            options = dict(getattr(entry, "settings", {}), optional=entry.optional)
            if entry.io_type == "COMBO":
                options["options"] = ANY if entry.id == "unet_name" else entry.options
            inputs.append((entry.id, entry.io_type, options))
        out[node_id] = (inputs, [entry.io_type for entry in schema.outputs])
    return out


def object_info_signatures(object_info: dict) -> dict:
    """Signatures of every node a running ComfyUI reports (`/object_info`), in the CORE_NODES form."""
    out = {}
    for node_id, info in object_info.items():
        inputs = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, info["input"].get(section, {})):
                kind, *rest = info["input"][section][name]
                options = dict(rest[0]) if rest else {}
                if isinstance(kind, list):  # V1 combo: the options in place of the type
                    kind, options["options"] = "COMBO", kind
                if kind == "COMBO" and name.endswith("_name"):  # model files differ per machine (Missing Models)
                    options["options"] = ANY
                inputs.append((name, kind, dict(options, optional=section == "optional")))
                if options.get("image_upload"):  # the frontend adds an upload widget after the file combo
                    inputs.append(("upload", "IMAGEUPLOAD", {}))
        out[node_id] = (inputs, list(info["output"]))
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


UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CNR_ID = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?")
VERSION = re.compile(r"v?(\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?|[0-9a-f]{7,40}|unknown)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(_number(v) for v in value)


def zod_errors(workflow: dict) -> list[str]:
    """The rules the frontend's zod schema (workflow 0.4, frontend 1.27) enforces on load; a violation shows the
    user an 'Invalid workflow against zod schema' toast."""
    errors = []
    if "id" in workflow and not (isinstance(workflow["id"], str) and UUID.fullmatch(workflow["id"])):
        errors.append(f"id must be a UUID, got {workflow['id']!r}")
    if not isinstance(workflow.get("last_node_id"), (int, str)) or isinstance(workflow.get("last_node_id"), bool):
        errors.append("last_node_id must be an integer or a string")
    for key in ("last_link_id", "version"):
        if not _number(workflow.get(key)):
            errors.append(f"{key} must be a number")
    for key in ("revision", "groups", "models", "floatingLinks", "definitions"):
        if key in workflow and workflow[key] is None:
            errors.append(f"{key} may be left out but not null")
    ds = (workflow.get("extra") or {}).get("ds")
    if ds is not None and not (_number(ds.get("scale")) and _vector(ds.get("offset"), 2)):
        errors.append("extra.ds needs a number scale and a 2-number offset")
    for model in workflow.get("models") or []:
        if not all(isinstance(model.get(k), str) for k in ("name", "url", "directory")) \
                or not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+$", model.get("url", "")):
            errors.append(f"model entry {model} needs name, an absolute url and directory")
    for group in workflow.get("groups") or []:
        if not isinstance(group.get("title"), str) or not _vector(group.get("bounding"), 4):
            errors.append(f"group {group.get('title')!r} needs a title and a 4-number bounding box")
    for link in workflow.get("links", []):
        if isinstance(link, list) and len(link) == 6 and (not all(_number(link[i]) for i in (0, 2, 4))
                                                          or link[5] is None or isinstance(link[5], bool)):
            errors.append(f"link {link}: ids and slots must be numbers, the type a string")
    for node in workflow.get("nodes", []):
        where = f"node {node.get('id')} ({node.get('type')})"
        for key, ok in (("pos", _vector(node.get("pos"), 2)), ("size", _vector(node.get("size"), 2)),
                        ("flags", isinstance(node.get("flags"), dict)), ("order", _number(node.get("order"))),
                        ("mode", _number(node.get("mode"))), ("properties", isinstance(node.get("properties"), dict))):
            if not ok:
                errors.append(f"{where}: bad '{key}' {node.get(key)!r}")
        for entry in node.get("inputs", []):
            if not isinstance(entry.get("name"), str) or "type" not in entry or \
                    not (entry.get("link") is None or _number(entry.get("link"))):
                errors.append(f"{where}: input {entry} needs name, type and a numeric or null link")
        for entry in node.get("outputs", []):
            if not (entry.get("links") is None or isinstance(entry.get("links"), list)):
                errors.append(f"{where}: output {entry.get('name')} links must be a list or null")
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        if "Node name for S&R" in properties and not isinstance(properties["Node name for S&R"], str):
            errors.append(f"{where}: 'Node name for S&R' must be a string")
        if "cnr_id" in properties and not (isinstance(properties["cnr_id"], str) and len(properties["cnr_id"]) <= 100
                                           and CNR_ID.fullmatch(properties["cnr_id"])):
            errors.append(f"{where}: bad cnr_id {properties['cnr_id']!r}")
        if "ver" in properties and not (isinstance(properties["ver"], str) and VERSION.fullmatch(properties["ver"])):
            errors.append(f"{where}: bad ver {properties['ver']!r}")
    return errors


TITLE_HEIGHT, ROW_HEIGHT, SLOT_HEIGHT = 30, 24, 20  # LiteGraph's title bar, widget row (with its gap) and slot row


def layout_errors(workflow: dict) -> list[str]:
    """A node too short for its widgets and slots (the frontend draws them past its bottom, under other nodes),
    and nodes whose boxes (title bar included) overlap."""
    errors, boxes = [], []
    for node in workflow.get("nodes", []):
        if not (_vector(node.get("pos"), 2) and _vector(node.get("size"), 2)):
            continue
        (x, y), (width, height) = node["pos"], node["size"]
        slots = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
        linked_widgets = sum(1 for entry in node.get("inputs", []) if entry.get("widget"))
        rows = max(0, len(node.get("widgets_values") or []) - linked_widgets)
        needed = slots * SLOT_HEIGHT + rows * ROW_HEIGHT + 10
        if node.get("type") != "MarkdownNote" and height < needed:
            errors.append(f"node {node['id']} ({node['type']}) is {height} px tall; its {rows} widgets and {slots} "
                          f"slot rows need {needed}")
        boxes.append((node["id"], node["type"], x, y - TITLE_HEIGHT, x + width, y + height))
    for i, (a_id, a_type, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b_id, b_type, bx0, by0, bx1, by1 in boxes[i + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                errors.append(f"nodes {a_id} ({a_type}) and {b_id} ({b_type}) overlap")
    return errors


def accepts(input_type: str, link_type: str) -> bool:
    """Whether an input socket takes a link of `link_type` (sockets may list several types: 'A,B'; '*' takes any)."""
    return input_type == "*" or link_type in input_type.split(",")


def validate(workflow: dict, signatures: dict) -> list[str]:
    """All problems found (empty = valid): the frontend's zod rules, node types, widgets, links, ids."""
    errors = zod_errors(workflow) + layout_errors(workflow)
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
        if out_type != kind or in_entry is None or not accepts(in_entry["type"], kind) or in_entry.get("link") != link_id:
            errors.append(f"link {link_id}: types or ends disagree ({out_type} -> {in_entry}, link says {kind})")
    return errors


def to_api_prompt(workflow: dict, signatures: dict) -> dict:
    """UI workflow -> API prompt, as the frontend's graphToPrompt does: widgets by name (control values dropped),
    links as [source id, slot], UI-only and muted nodes left out, bypassed nodes passed through (a consumer of their
    output takes their first input of the same type)."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}

    def source(link):
        node = nodes[link[1]]
        if node.get("mode", 0) != 4:
            return [str(link[1]), link[2]]
        through = next((e for e in node.get("inputs", []) if e.get("link") is not None and accepts(e["type"], link[5])),
                       None)
        return source(links[through["link"]]) if through is not None else None

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
                linked = source(links[entry["link"]])
                if linked is not None:
                    values[entry["name"]] = linked
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": values,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
