"""The feature cache: every clip encoded once, so a training step runs no VAE, text encoder or VFM.

Layout of `cache_dir`:
  fingerprint.json          the settings and models it was built with; another run with other ones is refused
  null_prompt.safetensors   the empty prompt (CFG dropout)
  samples/<key>.safetensors one per clip, named by a hash of the clip's entry (files, caption, range, crop):
      video_latents      [16, T', h, w]          one window of the clip at its bucket's size and frame count
      prompt_embeds      [L, text_dim]           the caption's tokens only (zero-padded at use)
      reference_latents  [A, K, 16, h, w]        A augmented copies of the K references, each a 1-frame VAE encode
      vfm_tokens         [A, K·T, vfm_dim]       VFM features on the DiT reference grid (T = H/16 · W/16), or, with
      reference_images   [A, K, 3, H, W] uint8   the augmented images instead (alignment.vfm_online); neither
                                                 without alignment, unless the cache already holds them
  samples/<key>.skip.json   why a clip could not be used
  records-<rank>.jsonl      what each process built (bucket, references or skip reason), appended as it goes
  index.json                the clips of this run's datasets that are in the cache, with their buckets

All processes build it together (each its share of the clips not cached yet), a killed build resumes where it
stopped, and clips added to a dataset later are encoded on the next run without redoing the others."""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import RefAlignInputError
from ..files import is_temp, remove_stale_temps, write_atomic
from ..inference.references import encode_references, fit_on_white
from ..models.safetensors_io import read_safetensors, write_safetensors
from ..models.text_encoder import encode_prompts
from ..models.vae import encode_video
from .buckets import assign_bucket
from .config import DatasetSource
from .data import ReferenceAugmentation, SkipCounter, file_identity, frames_at, load_video_clip, probe_video
from .datasets import ClipEntry, read_datasets

logger = logging.getLogger(__name__)
CACHE_VERSION = 2
FINGERPRINT_FILE = "fingerprint.json"
INDEX_FILE = "index.json"
SAMPLE_SUFFIX, SKIP_SUFFIX = ".safetensors", ".skip.json"


@dataclass(frozen=True)
class CacheSettings:
    sizes: tuple[tuple[int, int], ...]  # bucket sizes (width, height)
    frames: tuple[int, ...]  # bucket frame counts
    fps: float | None
    augment_copies: int = 4
    seed: int = 0
    vfm_dtype: str = "float16"
    store_images: bool = False  # VFM online: cache the augmented images, not VFM tokens
    # False: neither (no alignment: distillation, plain fine-tuning); the fingerprint's "vfm" says it, not "settings"
    vfm_features: bool = True

    @classmethod
    def from_config(cls, config) -> "CacheSettings":
        data = config.data
        return cls(tuple(tuple(s) for s in data.buckets.sizes), tuple(data.buckets.frames), data.fps,
                   data.augment_copies, config.seed, data.vfm_dtype,
                   config.alignment.enabled and config.alignment.vfm_online, config.alignment.enabled)


def model_identity(spec: str | None) -> str:
    """A named built-in model, or the identity of a file or of a folder's files."""
    if spec in (None, "", "efficientnet-lite0"):
        return "efficientnet-lite0"
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256("".join(f"{p.name}:{file_identity(str(p))};" for p in files).encode()).hexdigest()[:16]


def cache_fingerprint(config) -> dict:
    """What the cached features depend on besides the clips themselves."""
    settings = CacheSettings.from_config(config)
    vfm = ("none" if not settings.vfm_features else "online" if settings.store_images
           else model_identity(config.model.vfm))
    return {"version": CACHE_VERSION,
            "settings": json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "vfm_features"})),
            "vae": model_identity(config.model.vae), "text_encoder": model_identity(config.model.text_encoder),
            "vfm": vfm}


def entry_key(entry: ClipEntry) -> str:
    """A clip's cache name: a hash of its files' contents (not their paths: a moved dataset keeps its cache),
    caption, frame range, crop and references."""
    refs = [[ref.subject, ref.scene, [v.key() for v in ref.views]] for ref in entry.references]
    text = json.dumps([file_identity(str(entry.video)), entry.caption, entry.frame_range, entry.crop, refs])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_fingerprint(cache_dir: Path, fingerprint: dict) -> None:
    """Refuse a cache built with other settings or models, naming what differs; write the fingerprint if new. A
    cache with VFM features also serves a run that needs none (its new clips get them too: `prepare_cache`)."""
    path = cache_dir / FINGERPRINT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        differs = sorted(k for k in fingerprint.keys() | saved.keys() if saved.get(k) != fingerprint.get(k)
                         and not (k == "vfm" and fingerprint[k] == "none"))
        if differs:
            raise RefAlignInputError(
                f"data.cache_dir {cache_dir} was built with other {', '.join(differs)} than this run's; point "
                "data.cache_dir to another folder or delete this one")
        return
    remove_stale_temps(cache_dir)  # a fingerprint whose writer was killed before its rename
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise RefAlignInputError(f"data.cache_dir {cache_dir} is not empty and holds no feature cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(fingerprint, indent=1))


def estimate_sample_bytes(settings: CacheSettings, references: float, text_dim: int, vfm_dim: int,
                          text_tokens: int = 128) -> dict[str, float]:
    """Bytes of one cached clip per array, at the mean bucket size and the longest frame bucket."""
    area = sum(w * h for w, h in settings.sizes) / len(settings.sizes)
    latent_frame = 16 * area / 64 * 4  # fp32
    sizes = {"video latents": latent_frame * ((max(settings.frames) - 1) // 4 + 1),
             "text": text_tokens * text_dim * 4,
             "reference latents": settings.augment_copies * references * latent_frame}
    if settings.store_images:
        sizes["reference images"] = settings.augment_copies * references * 3 * area
    elif settings.vfm_features:
        sizes["VFM tokens"] = (settings.augment_copies * references * area / 256 * vfm_dim
                               * torch.finfo(getattr(torch, settings.vfm_dtype)).bits / 8)
    return sizes


def trim_prompt(embeds: torch.Tensor) -> torch.Tensor:
    """Drop the zero padding (the encoder zeroes every position past the prompt's tokens)."""
    length = int((embeds.abs().sum(-1) > 0).nonzero().max()) + 1 if embeds.abs().sum() > 0 else 1
    return embeds[:length].contiguous()


def reference_images(entry: ClipEntry, width: int, height: int, copy: int) -> torch.Tensor:
    """`[K, 3, height, width]` in [0, 1]: each reference's view for this copy, fitted on white (subjects cut out by
    their mask or alpha; scenes whole)."""
    images = []
    for ref in entry.references:
        image, mask = ref.view(copy).load()
        if ref.scene:
            images.append(fit_on_white(image.convert("RGB"), width, height, name=str(ref.view(copy))))
        else:
            images.append(fit_on_white(image, width, height, mask=mask, name=str(ref.view(copy))))
    return torch.stack(images)


def _key_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + int(key[:12], 16)) % (2**63)


def clip_bucket(entry: ClipEntry, info, fps: float | None, sizes, frame_counts) -> tuple[tuple[int, int, int], dict]:
    """The bucket (width, height, frames) a clip goes to, and the facts it was chosen from (size after the crop,
    frames available at `fps`); raises what makes the cache skip the clip. `prepare` applies the same rule."""
    width, height = info.width, info.height
    if entry.crop is not None:
        x0, y0, x1, y1 = entry.crop
        width, height = min(x1, info.width) - max(0, x0), min(y1, info.height) - max(0, y0)
        if width < 2 or height < 2:
            raise RefAlignInputError(f"crop {entry.crop} leaves nothing of the {info.width}x{info.height} video")
    available = frames_at(fps, info, entry.frame_range)
    bucket = assign_bucket(width, height, available, sizes, frame_counts)
    if bucket is None:
        raise RefAlignInputError(f"{available} frames at {fps or info.fps:g} fps, fewer than the shortest frame "
                                 f"bucket ({min(frame_counts)})")
    return bucket, {"width": width, "height": height, "available": available}


@torch.no_grad()
def encode_clip(entry: ClipEntry, key: str, settings: CacheSettings, encoders, augment) -> tuple[dict, dict]:
    """One clip -> (tensors, metadata) of its sample file."""
    generator = torch.Generator().manual_seed(_key_seed(settings.seed, key))
    info = probe_video(entry.video)
    w, h, frames = clip_bucket(entry, info, settings.fps, settings.sizes, settings.frames)[0]
    clip = load_video_clip(entry.video, frames, settings.fps, h, w, generator, entry.frame_range, entry.crop, info)
    copies = torch.stack([augment(reference_images(entry, w, h, a), generator)
                          for a in range(settings.augment_copies)])  # [A, K, 3, H, W]
    vae, (a, k) = encoders.vae, copies.shape[:2]
    references = encode_references(vae, copies.flatten(0, 1))[0].transpose(0, 1)  # every copy in one batch
    tensors = {
        "video_latents": encode_video(vae, clip[None])[0].float().cpu(),
        "prompt_embeds": trim_prompt(encode_prompts(encoders.text_encoder, [entry.caption])[0]),
        "reference_latents": references.unflatten(0, (a, k)).float(),  # [A, K, 16, h, w]
    }
    if settings.store_images:
        tensors["reference_images"] = (copies * 255).round().to(torch.uint8)
    elif settings.vfm_features:
        device = next(vae.parameters()).device  # the encoders share one device
        tokens = encoders.vfm(copies.flatten(0, 1).to(device))  # [A·K, T, D]
        tensors["vfm_tokens"] = tokens.unflatten(0, (a, k)).flatten(1, 2).to(getattr(torch, settings.vfm_dtype)).cpu()
    metadata = {"width": w, "height": h, "frames": frames, "references": len(entry.references),
                "source": entry.source}
    return tensors, metadata


def build_cache(entries: list[ClipEntry], cache_dir: str | os.PathLike, settings: CacheSettings, encoders,
                rank: int = 0, world_size: int = 1, progress: bool = True) -> int:
    """Encode this process's share of the clips not in the cache yet (clip i of those goes to process
    i mod world_size). Unusable clips are recorded with their reason. Returns how many this process encoded."""
    cache_dir = Path(cache_dir)
    samples = cache_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (cache_dir / "null_prompt.safetensors").is_file():
        write_safetensors({"prompt_embeds": trim_prompt(encode_prompts(encoders.text_encoder, [""])[0])},
                          cache_dir / "null_prompt.safetensors")
    todo = missing_entries(entries, cache_dir)[rank::world_size]
    augment = ReferenceAugmentation()
    records = cache_dir / f"records-{rank}.jsonl"
    built = 0
    for entry, key in tqdm(todo, desc=f"caching (process {rank})", disable=not progress):
        try:
            tensors, metadata = encode_clip(entry, key, settings, encoders, augment)
        except (OSError, ValueError, RuntimeError) as e:  # missing / corrupt files, clips too short, bad masks
            reason = f"{type(e).__name__}: {e}"
            logger.warning("skipping %s: %s", entry.source, reason)
            write_atomic(samples / f"{key}{SKIP_SUFFIX}", json.dumps({"source": entry.source, "reason": reason}))
            record = {"key": key, "skip": reason, "source": entry.source}
        else:
            write_safetensors(tensors, samples / f"{key}{SAMPLE_SUFFIX}", {k: str(v) for k, v in metadata.items()})
            record = {"key": key, **metadata}
            built += 1
        with records.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return built


def read_skip(path: Path) -> dict | None:
    """A clip's skip marker, or None when it is missing or unreadable (the clip is then tried again)."""
    try:
        skip = json.loads(path.read_text())
        return skip if isinstance(skip, dict) and isinstance(skip.get("reason"), str) else None
    except (OSError, ValueError):
        return None


def finished_keys(samples: Path) -> set[str]:
    """Keys of the clips the cache holds a finished sample or a readable skip marker for (temp files of killed
    writers and unreadable markers do not count)."""
    done = set()
    for path in samples.iterdir() if samples.is_dir() else ():
        if path.name.endswith(SAMPLE_SUFFIX) and not is_temp(path.name):
            done.add(path.name[:-len(SAMPLE_SUFFIX)])
        elif path.name.endswith(SKIP_SUFFIX) and not is_temp(path.name) and read_skip(path) is not None:
            done.add(path.name[:-len(SKIP_SUFFIX)])
    return done


def missing_entries(entries: list[ClipEntry], cache_dir: Path) -> list[tuple[ClipEntry, str]]:
    done = finished_keys(cache_dir / "samples")
    unique = {}
    for entry in entries:
        unique.setdefault(entry_key(entry), entry)
    return [(entry, key) for key, entry in unique.items() if key not in done]


def _records(cache_dir: Path) -> dict[str, dict]:
    records = {}
    for file in sorted(cache_dir.glob("records-*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            records[record["key"]] = record
    return records


def write_index(entries: list[ClipEntry], cache_dir: str | os.PathLike) -> dict:
    """index.json for this run's clips: those in the cache with their bucket; skips counted with reasons."""
    cache_dir = Path(cache_dir)
    records = _records(cache_dir)
    samples, skipped, seen = [], SkipCounter(), set()
    for entry in entries:
        key = entry_key(entry)
        if key in seen:
            continue
        seen.add(key)
        record = records.get(key)
        if record is None and (cache_dir / "samples" / f"{key}{SAMPLE_SUFFIX}").is_file():  # killed before its record
            _, metadata = read_safetensors(cache_dir / "samples" / f"{key}{SAMPLE_SUFFIX}", "feature cache")
            record = {"key": key, **{k: metadata[k] if k == "source" else int(metadata[k])
                                     for k in ("width", "height", "frames", "references", "source")}}
        elif record is None and (skip := read_skip(cache_dir / "samples" / f"{key}{SKIP_SUFFIX}")) is not None:
            record = {"key": key, "skip": skip["reason"]}
        if record is None:
            raise RefAlignInputError(f"feature cache {cache_dir}: {entry.source} was never encoded (the build did "
                                     "not finish)")
        if "skip" in record:
            kind, _, reason = record["skip"].partition(": ")
            skipped.skip(entry.source, reason, kind=kind, log=False)
            continue
        samples.append({"key": key, "bucket": [record["width"], record["height"], record["frames"]],
                        "references": record["references"], "repeats": entry.repeats, "source": entry.source})
    if not samples:
        raise RefAlignInputError(f"dataset: no usable clips ({skipped.total} skipped: "
                                 f"{[reason for _, reason in skipped.entries[:5]]})")
    index = {"version": CACHE_VERSION, "samples": samples, "skipped": skipped.total,
             "skipped_reasons": skipped.reasons, "skipped_examples": skipped.entries[:50]}
    write_atomic(cache_dir / INDEX_FILE, json.dumps(index, indent=1))
    for folder in (cache_dir, cache_dir / "samples"):  # what killed writers left
        remove_stale_temps(folder)
    logger.info("feature cache %s: %d clips (%d skipped)", cache_dir, len(samples), skipped.total)
    return index


class FeatureCache(torch.utils.data.Dataset):
    """The cached clips of this run (index.json): `cache[i]` is one clip's tensors."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise RefAlignInputError(f"feature cache {self.dir} is not built (no {INDEX_FILE})")
        self.index = json.loads(index_path.read_text())
        self.null_prompt = read_safetensors(self.dir / "null_prompt.safetensors", "feature cache")[0]["prompt_embeds"]
        self.samples = self.index["samples"]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def buckets(self) -> list[tuple[int, int, int]]:
        return [tuple(s["bucket"]) for s in self.samples]

    def batch_groups(self, by_references: bool = False) -> list[tuple[int, ...]]:
        """What a batch must share: the bucket (width, height, frames), and with `by_references` the number of
        references too."""
        return [tuple(s["bucket"]) + ((s["references"],) if by_references else ()) for s in self.samples]

    @property
    def repeats(self) -> list[int]:
        return [s["repeats"] for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return read_safetensors(self.dir / "samples" / f"{self.samples[index]['key']}{SAMPLE_SUFFIX}",
                                "feature cache")[0]

    @property
    def vfm_dim(self) -> int:
        first = self[0]
        return int(first["vfm_tokens"].shape[-1]) if "vfm_tokens" in first else 0


def _dataset_entries(config, output_dir: Path, accelerator) -> list[ClipEntry]:
    """The clips of every configured dataset (a generated toy world when none is configured)."""
    sources = config.data.datasets
    if not sources:
        from ..toy.world import make_toy_world

        manifest = output_dir / "data" / "manifest.jsonl"
        if accelerator.is_main_process and not manifest.is_file():
            make_toy_world(output_dir / "data", seed=config.seed, num_videos=config.data.toy_world.num_videos,
                           size=config.data.toy_world.size, frames=config.data.toy_world.frames)
        accelerator.wait_for_everyone()
        sources = [DatasetSource(path=str(manifest))]
    skipped = SkipCounter()
    entries = read_datasets(sources, skipped, config.data.max_references)
    if skipped.total and accelerator.is_main_process:
        logger.warning("datasets: %d entries skipped (%s)", skipped.total, skipped.reasons)
    return entries


def _log_estimate(cache_dir: Path, settings: CacheSettings, todo: list, total: int, encoders) -> None:
    """How much the clips still to encode will take of the cache's disk, with a warning when it may not fit."""
    mean_refs = sum(len(e.references) for e, _ in todo) / len(todo)
    vfm_dim = encoders.vfm.dim if settings.vfm_features and not settings.store_images else 0
    sizes = estimate_sample_bytes(settings, mean_refs, encoders.text_encoder.dim, vfm_dim)
    per_clip = sum(sizes.values())
    free = shutil.disk_usage(cache_dir).free
    logger.info("feature cache %s: %d of %d clips to encode, about %.1f MB each (%s) = %.2f GB; %.1f GB free",
                cache_dir, len(todo), total, per_clip / 1e6,
                ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()), per_clip * len(todo) / 1e9,
                free / 1e9)
    if per_clip * len(todo) > free:
        logger.warning("the feature cache may not fit on the disk of %s", cache_dir)


def prepare_cache(config, output_dir: Path, accelerator, encoders) -> FeatureCache:
    """Build what is missing of the run's feature cache (all processes, each its share), then index this run's
    clips."""
    cache_dir = Path(config.data.cache_dir or output_dir / "cache")
    entries = _dataset_entries(config, output_dir, accelerator)
    if accelerator.is_main_process:
        check_fingerprint(cache_dir, cache_fingerprint(config))
    accelerator.wait_for_everyone()
    saved = json.loads((cache_dir / FINGERPRINT_FILE).read_text())  # this run's, or a cache that serves it
    settings = replace(CacheSettings.from_config(config), vfm_features=saved["vfm"] != "none")
    todo = missing_entries(entries, cache_dir)
    if todo and accelerator.is_main_process:
        _log_estimate(cache_dir, settings, todo, len(entries), encoders)
    if todo:
        build_cache(entries, cache_dir, settings, encoders, accelerator.process_index, accelerator.num_processes,
                    progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_index(entries, cache_dir)
    accelerator.wait_for_everyone()
    return FeatureCache(cache_dir)
