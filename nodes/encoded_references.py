"""RefAlign Save / Load Encoded References: the references fitted and VAE-encoded once, saved under ComfyUI's
`models/refalign_references/` (registered with `folder_paths`; never inside this pack's folder) and loaded again,
checked against the VAE and the size, instead of being encoded on every run. The file format is the core's
(`refalign_core.inference.reference_files`): the CLI's `encode-references` writes the same files and
`generate --reference-latents` reads them."""

import dataclasses
import os
import re
from pathlib import Path

from comfy_api.latest import io

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.reference_files import load_reference_latents, save_reference_latents

from . import runtime
from .native import ComfyVAECodec
from .references import REFERENCES, ReferenceSet
from .sampler import DEFAULTS, MAX_RESOLUTION, SIZE_MULTIPLE

FOLDER = "refalign_references"  # models/refalign_references
SUFFIX = ".safetensors"
PACK_ROOT = Path(__file__).resolve().parents[1]


def register_folder() -> None:
    runtime.register_model_folder(FOLDER, {SUFFIX})


def reference_files() -> list[str]:
    """The encoded-reference files ComfyUI lists in models/refalign_references (and extra paths), by relative name."""
    if not runtime.comfy_available():
        return []
    import folder_paths
    register_folder()
    return sorted(f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(SUFFIX))


def reference_file_path(name: str) -> str:
    import folder_paths
    register_folder()
    path = folder_paths.get_full_path(FOLDER, name) if name else None
    if not path:
        raise RefAlignInputError(f"encoded_references: {name!r} is not a file in models/{FOLDER}; save references "
                                 "with RefAlign Save Encoded References first (or refresh the list)")
    return path


def output_path(filename_prefix: str) -> tuple[Path, str]:
    """(the next free file for `filename_prefix`, its name relative to the folder) in the first models/
    refalign_references folder: `<prefix>_00001_.safetensors`, …, as ComfyUI's save nodes number their files. The
    prefix may name subfolders, never a path outside that folder (nor into this pack)."""
    import folder_paths
    register_folder()
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0]).resolve()
    prefix = (filename_prefix or "").strip().replace("\\", "/")
    target = (folder / prefix).resolve()
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or not target.is_relative_to(folder) \
            or target == folder:
        raise RefAlignInputError(f"filename_prefix: {filename_prefix!r} must be a file name (optionally in "
                                 f"subfolders) inside models/{FOLDER}")
    if target.is_relative_to(PACK_ROOT):
        raise RefAlignInputError(f"filename_prefix: models/{FOLDER} ({folder}) lies inside the RefAlign pack's "
                                 "folder, which must hold no user files; register another folder for "
                                 f"{FOLDER} in extra_model_paths.yaml")
    numbered = re.compile(re.escape(target.name) + r"_(\d+)_" + re.escape(SUFFIX) + "$")
    existing = os.listdir(target.parent) if target.parent.is_dir() else []
    counter = max((int(m.group(1)) for m in map(numbered.match, existing) if m), default=0) + 1
    path = target.parent / f"{target.name}_{counter:05d}_{SUFFIX}"
    return path, path.relative_to(folder).as_posix()


def size_inputs() -> list:
    return [io.Int.Input("width", default=DEFAULTS.width, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                         tooltip="The video width the references are fitted at: the sampler's width."),
            io.Int.Input("height", default=DEFAULTS.height, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                         tooltip="The video height the references are fitted at: the sampler's height.")]


def vae_input(tooltip: str):
    return io.Vae.Input("vae", tooltip=tooltip)


def check_vae(vae) -> ComfyVAECodec:
    if vae is None or not hasattr(vae, "encode"):
        raise RefAlignInputError("vae: no VAE; connect Load VAE (wan_2.1_vae), or the VAE output of RefAlign Loader "
                                 "for a bundle")
    return ComfyVAECodec(vae)


def save_encoded(vae, references: ReferenceSet, width: int, height: int, filename_prefix: str):
    """(the references with their latents attached, the saved file's name in models/refalign_references)."""
    codec = check_vae(vae)
    path, name = output_path(filename_prefix)
    latents = codec.encode_references(references.fitted(width, height))
    names = [r.name or f"subject {k + 1}" for k, r in enumerate(references.references)]
    save_reference_latents(path, latents, width=width, height=height, vae_probe=codec, names=names,
                           what="references")
    encoded = load_reference_latents(path, width=width, height=height, what="references")  # what the file holds
    return ReferenceSet(list(references.references), dataclasses.replace(encoded, source=name)), name


def load_encoded(name: str, vae, width: int, height: int) -> ReferenceSet:
    codec = check_vae(vae)
    encoded = load_reference_latents(reference_file_path(name), width=width, height=height, vae_probe=codec,
                                     what="encoded_references")
    return ReferenceSet([], dataclasses.replace(encoded, source=name))


class RefAlignSaveEncodedReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignSaveEncodedReferences", display_name="RefAlign Save Encoded References",
            category="RefAlign", is_output_node=True,
            description=f"Fits the references at width × height and VAE-encodes each once (as the sampler does), "
                        f"then saves the latents to models/{FOLDER}/<prefix>_00001_.safetensors with the size and a "
                        "fingerprint of the VAE. RefAlign Load Encoded References reads them back, so later runs "
                        "skip the encoding; the CLI reads the same files (generate --reference-latents).",
            inputs=[
                vae_input("The VAE the sampler uses (Load VAE wan_2.1_vae, or RefAlign Loader's)."),
                REFERENCES.Input("references", tooltip="From RefAlign Multi-Subject Reference."),
                *size_inputs(),
                io.String.Input("filename_prefix", default="refalign_refs",
                                tooltip=f"File name in models/{FOLDER} (subfolders allowed); a number is added."),
            ],
            outputs=[
                REFERENCES.Output(display_name="references", tooltip="The same references with their latents "
                                                                     "attached: the sampler uses the latents, the "
                                                                     "Identity Check the images."),
            ],
        )

    @classmethod
    def execute(cls, vae, references, width, height, filename_prefix) -> io.NodeOutput:
        refs, name = save_encoded(vae, references, width, height, filename_prefix)
        return io.NodeOutput(refs, ui={"text": [f"models/{FOLDER}/{name}"]})


class RefAlignLoadEncodedReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignLoadEncodedReferences", display_name="RefAlign Load Encoded References",
            category="RefAlign",
            description=f"Loads references encoded by RefAlign Save Encoded References (or the CLI's "
                        f"encode-references) from models/{FOLDER}. The file is checked against this VAE (it encodes "
                        "a small probe image and compares it with the one stored) and against width × height, so "
                        "latents from another VAE or another size are refused instead of giving a wrong video. "
                        "They carry no images: the Identity Check needs the subject images themselves.",
            inputs=[
                io.Combo.Input("encoded_references", options=reference_files(),
                               tooltip=f"A file from models/{FOLDER}."),
                vae_input("The VAE the sampler uses; it must be the one the references were encoded with."),
                *size_inputs(),
            ],
            outputs=[
                REFERENCES.Output(display_name="references", tooltip="The encoded references, for the R2V Sampler "
                                                                     "or Subject Conditioning."),
            ],
        )

    @classmethod
    def execute(cls, encoded_references, vae, width, height) -> io.NodeOutput:
        return io.NodeOutput(load_encoded(encoded_references, vae, width, height))
