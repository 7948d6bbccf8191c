"""The training configuration: typed dataclasses whose defaults are the release recipe (RefAlign-1.3B stage 1:
480×832, 81 frames at 25 fps, AdamW lr 5e-5, batch 1, blocks 0..8, λ = 1, margins 0 / 1, shift 5, CFG dropout
10 % / 10 % / 10 %, bf16, gradient checkpointing).

A YAML file overrides any subset. Unknown keys, keys given twice, wrong types and out-of-range values are refused
with the key path, before anything is loaded; `TrainingConfig.validated()` runs the same checks on a config built in
Python."""

import dataclasses
import json
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..errors import RefAlignInputError
from ..validation import describe, finite_number, in_range, one_of, whole_number
from ..inference.sampler import PRESETS, SIZE_MULTIPLE, SamplingSettings, is_frame_count, is_video_size

DATASET_FORMATS = ("jsonl", "folder", "opens2v")


def _range(minimum=None, maximum=None, exclusive_minimum=False, exclusive_maximum=False):
    return {"minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
            "exclusive_maximum": exclusive_maximum}


def _fail(source: str, path: str, message: str) -> None:
    raise RefAlignInputError(f"{source}: {path or 'the top level'}: {message}")


POSITIVE = _range(0, exclusive_minimum=True)
AT_LEAST_1 = _range(1)
NON_NEGATIVE = _range(0)
PROBABILITY = _range(0, 1)


@dataclass
class ModelConfig:
    dit: str | None = None  # a DiT .safetensors (Wan2.1-T2V / RefAlign) to start from; or give dit_config
    dit_config: dict[str, int] | None = None  # instead of dit: the architecture of a DiT trained from random weights
    vae: str | None = None  # a Wan2.1 VAE .safetensors (required to train)
    text_encoder: str | None = None  # a umT5 folder (required to train)
    # the release aligns to DINOv3 ViT-L/16 (give its local folder); the default runs offline
    vfm: str = "efficientnet-lite0"


@dataclass
class DatasetSource:
    path: str | None = field(default=None, metadata={"required": "the dataset's manifest, folder or JSON"})
    format: Literal["jsonl", "folder", "opens2v"] = "jsonl"
    repeats: int = field(default=1, metadata=AT_LEAST_1)  # entries appear this many times per epoch
    videos: str | None = None  # opens2v: the folder holding the clips (default: the JSON's folder)
    backgrounds: str | None = None  # opens2v: its inpainted backgrounds (<clip id>.png), added as scene references


@dataclass
class ToyWorldConfig:
    num_videos: int = field(default=8, metadata=AT_LEAST_1)
    size: int = field(default=64, metadata=_range(16))
    frames: int = field(default=17, metadata=AT_LEAST_1)


@dataclass
class BucketConfig:
    """Each clip goes to the size whose aspect ratio is closest to its own and the largest frame count it has."""

    sizes: list[list[int]] = field(default_factory=lambda: [[832, 480]])  # [width, height], multiples of 16
    frames: list[int] = field(default_factory=lambda: [81])  # 4n+1
    # a batch also holds one reference count only: no padded references, no key mask (faster where counts vary)
    by_references: bool = False

    def _check(self, source: str, path: str) -> None:
        if not self.sizes:
            _fail(source, f"{path}.sizes", "needs at least one [width, height]")
        for i, size in enumerate(self.sizes):
            if len(size) != 2 or not all(is_video_size(s) for s in size):
                _fail(source, f"{path}.sizes[{i}]", f"must be [width, height], positive multiples of {SIZE_MULTIPLE}, "
                      f"got {size}")
        if not self.frames:
            _fail(source, f"{path}.frames", "needs at least one frame count")
        for i, frames in enumerate(self.frames):
            if not is_frame_count(frames):
                _fail(source, f"{path}.frames[{i}]", f"must be 4n+1 (1, 5, …, 81), got {frames}")


@dataclass
class DataConfig:
    datasets: list[DatasetSource] = field(default_factory=list)  # none: a toy world is generated into OUTPUT/data
    toy_world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    fps: float | None = field(default=25.0, metadata=POSITIVE)  # None: keep each video's own rate
    max_references: int = field(default=3, metadata=_range(1, 4))  # released models: 1–3 per clip
    augment_copies: int = field(default=4, metadata=AT_LEAST_1)  # augmented copies of the references, cached
    cache_dir: str | None = None  # default OUTPUT/cache
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)  # DataLoader worker processes
    vfm_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # cached VFM tokens


@dataclass
class TrainConfig:
    mode: Literal["full", "lora"] = "full"  # the release fine-tunes the whole DiT
    lora_rank: int = field(default=16, metadata=AT_LEAST_1)
    lora_alpha: float = field(default=16.0, metadata=POSITIVE)
    lr: float = field(default=5e-5, metadata=POSITIVE)
    warmup_steps: int = field(default=5, metadata=NON_NEGATIVE)
    weight_decay: float = field(default=0.01, metadata=NON_NEGATIVE)
    batch_size: int = field(default=1, metadata=AT_LEAST_1)  # per process; the release uses 1 per GPU
    max_steps: int = field(default=3000, metadata=AT_LEAST_1)
    checkpoint_every: int = field(default=500, metadata=AT_LEAST_1)
    keep_last: int | None = field(default=3, metadata=AT_LEAST_1)  # None: keep every checkpoint
    grad_accum: int = field(default=1, metadata=AT_LEAST_1)
    max_grad_norm: float | None = field(default=None, metadata=POSITIVE)  # None: no clipping, as released
    ema_decay: float | None = field(default=None, metadata=_range(0, 1, True, True))  # export an EMA of the weights
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    # the flow-matching loss weight over timesteps: "release" (w(t), 0 at pure noise) or "uniform" (from scratch)
    loss_weighting: Literal["release", "uniform"] = "release"


@dataclass
class MemoryConfig:
    """What trades speed for memory (README "Memory presets"; block offload is FSDP2 with CPU offload, an accelerate
    config: `train/accelerate/fsdp_offload.yaml`)."""

    gradient_checkpointing: bool = True
    base_weights: Literal["default", "bf16", "fp8_e4m3fn"] = "default"  # LoRA: storage of the frozen base weights


@dataclass
class AlignmentConfig:
    enabled: bool = True
    blocks: list[int] | None = None  # None: 0..8, or the first third of a smaller model
    weight: float = field(default=1.0, metadata=NON_NEGATIVE)  # λ
    pos_margin: float = field(default=0.0, metadata=_range(0, 2))
    neg_margin: float = field(default=1.0, metadata=_range(0, 2))
    neg_weight: float = field(default=1.0, metadata=NON_NEGATIVE)
    init_projectors: str | None = None  # projectors.safetensors of an earlier stage
    vfm_online: bool = False  # run the VFM every step on the augmented references (caches images, not tokens)


@dataclass
class DropoutConfig:
    text: float = field(default=0.1, metadata=PROBABILITY)
    references: float = field(default=0.1, metadata=PROBABILITY)
    both: float = field(default=0.1, metadata=PROBABILITY)

    def _check(self, source: str, path: str) -> None:
        if self.text + self.references + self.both > 1:
            total = self.text + self.references + self.both
            _fail(source, path, f"text + references + both must be ≤ 1, got {total}")


@dataclass
class PreviewConfig:
    prompts: str | None = None  # sample-prompts file (see `previews.py`); None: no previews
    every: int = field(default=500, metadata=AT_LEAST_1)
    at_start: bool = True  # also before the first step, as the baseline to compare with
    shift: float | None = field(default=None, metadata=POSITIVE)  # None: the training shift


@dataclass
class DistillConfig:
    """Turbo: a few-step, one-pass student (LoRA) distilled from the frozen DiT sampled with three-pass guidance
    (`distill.py`); the teacher and the student use the training `shift`."""

    enabled: bool = False
    student_steps: int = field(default=PRESETS["turbo"]["steps"], metadata=AT_LEAST_1)  # the turbo preset's steps
    teacher_steps: int = field(default=SamplingSettings.steps, metadata=AT_LEAST_1)
    teacher_image_scale: float = SamplingSettings.image_scale
    teacher_text_scale: float = SamplingSettings.text_scale
    negative_prompt: str | None = None  # the teacher's; None: the Wan2.1 negative prompt of the official inference
    # the loss's terms (`distill.py`): the distance to the teacher's sample from the same noise (0: the teacher does
    # not sample), and distribution matching, which adds a second LoRA, the fake score, trained with the student
    regression_weight: float = field(default=1.0, metadata=NON_NEGATIVE)
    dmd_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    # the fake score's updates per student update (DMD2's two time-scale rule: 5); on the other steps the fake score
    # alone learns, from a student sample drawn without gradients
    fake_score_updates: int = field(default=1, metadata=AT_LEAST_1)

    def teacher(self, shift: float) -> SamplingSettings:
        return SamplingSettings(steps=self.teacher_steps, shift=shift, image_scale=self.teacher_image_scale,
                                text_scale=self.teacher_text_scale)

    def student(self, settings: SamplingSettings) -> SamplingSettings:
        """`settings` sampled as the student is trained: its Euler steps, the prompt pass alone."""
        return settings.replace(steps=self.student_steps, guidance_steps=0, sampler="euler")


@dataclass
class TrainingConfig:
    seed: int = field(default=0, metadata=_range(0, 2**31 - 1))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    previews: PreviewConfig = field(default_factory=PreviewConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    shift: float = field(default=5.0, metadata=POSITIVE)
    # prompts are zero-padded to this, as at inference; None: the text encoder's own length (512 for Wan2.1)
    text_length: int | None = field(default=None, metadata=AT_LEAST_1)

    def _check(self, source: str, path: str) -> None:
        if self.train.mode != "lora" and self.memory.base_weights != "default":
            _fail(source, "memory.base_weights", "applies to LoRA training (train.mode: lora), where the base "
                                                 "weights are frozen")
        if self.alignment.blocks is not None and (not self.alignment.blocks or min(self.alignment.blocks) < 0):
            _fail(source, "alignment.blocks", f"must be block indices ≥ 0 (or null), got {self.alignment.blocks}")
        if self.distill.enabled:
            try:
                self.distill.teacher(self.shift)
            except RefAlignInputError as e:
                _fail(source, "distill", f"the teacher's settings: {e}")
            if not (self.distill.regression_weight or self.distill.dmd_weight):
                _fail(source, "distill.regression_weight", "distill.regression_weight and distill.dmd_weight are "
                                                           "both 0: give at least one a weight above 0")
            if self.distill.fake_score_updates > 1 and not self.distill.dmd_weight:
                _fail(source, "distill.fake_score_updates", "the fake score exists for distribution matching only: "
                                                            "give distill.dmd_weight a weight above 0, or set 1")
            if self.train.mode != "lora":
                _fail(source, "distill.enabled", "the student is LoRA adapters on the frozen teacher: set train.mode: "
                                                 "lora")
            if self.alignment.enabled:
                _fail(source, "distill.enabled", "distillation has no alignment loss: set alignment.enabled: false")
            if self.dropout.text or self.dropout.references or self.dropout.both:
                _fail(source, "distill.enabled", "the student learns the prompt and references as given: set "
                                                 "dropout.text, dropout.references and dropout.both to 0")
        if self.model.dit is not None and self.model.dit_config is not None:
            _fail(source, "model.dit_config", "is for a DiT trained from random weights: give it or model.dit, "
                                              "not both")

    def validated(self, source: str = "config") -> "TrainingConfig":
        """The same checks as a YAML file gets; returns a checked copy."""
        return parse_config(dataclasses.asdict(self), source)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _parse_section(tp, value, source: str, path: str):
    """A config section (a dataclass): every key parsed, defaults filled in, required keys and ranges checked."""
    if not isinstance(value, dict):
        _fail(source, path, f"expected a section (key: value pairs), got {describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise RefAlignInputError(f"{source}: unknown key {', '.join(where + str(k) for k in unknown)} "
                                 f"(known here: {', '.join(fields)})")
    parsed = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        item = _parse(f.type, value[name], source, key) if name in value else None
        if name not in value:
            item = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if item is None and f.metadata.get("required"):
            _fail(source, key, f"required: {f.metadata['required']}")
        if item is not None and ("minimum" in f.metadata or "maximum" in f.metadata):
            in_range(f"{source}: {key}", item, f.metadata.get("minimum"), f.metadata.get("maximum"),
                     f.metadata.get("exclusive_minimum", False), f.metadata.get("exclusive_maximum", False))
        parsed[name] = item
    result = tp(**parsed)
    check = getattr(result, "_check", None)
    if check is not None:
        check(source, path)
    return result


def _parse(tp, value, source: str, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_section(tp, value, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _parse(options[0], value, source, path)
    if value is None:
        _fail(source, path, "must not be empty (null)")
    if origin is Literal:
        return one_of(f"{source}: {path}", value, args)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(source, path, f"expected a list, got {describe(value)}")
        return [_parse(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(source, path, f"expected a section (key: value pairs), got {describe(value)}")
        return {str(k): _parse(args[1], v, source, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, path, f"expected true or false, got {describe(value)}")
        return value
    if tp is int:
        return whole_number(f"{source}: {path}", value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-4)"
                except ValueError:
                    pass
            _fail(source, path, f"expected a number, got {describe(value)}{hint}")
        return finite_number(f"{source}: {path}", value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, path, f"expected text, got {describe(value)}")
        return value
    raise TypeError(f"config field type {tp} is not supported")


def parse_config(values: dict, source: str = "config") -> TrainingConfig:
    return _parse(TrainingConfig, values, source, "")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice, at the marks `first` and `again`."""

    def __init__(self, key, first: yaml.Mark, again: yaml.Mark):
        lines = f"line {first.line + 1}" if first.line == again.line else \
            f"lines {first.line + 1} and {again.line + 1}"
        super().__init__(f"key {key!r} is given twice (on {lines}); YAML would keep only the last one: merge them")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (plain YAML keeps the last silently); keys
    that a merge (`<<: *anchor`) brings in may still be overridden."""

    def __init__(self, stream):
        super().__init__(stream)
        self.checked_nodes: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self.checked_nodes:  # once per node, before merges are flattened into it
            self.checked_nodes.add(id(node))
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # the constructor refuses it
                    continue
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
        super().flatten_mapping(node)


def _yaml(text_or_file, source: str):
    try:
        return yaml.load(text_or_file, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise RefAlignInputError(f"{source}: {e}") from e
    except yaml.YAMLError as e:
        raise RefAlignInputError(f"{source}: not valid YAML: {e}") from e


def _set(values: dict, dotted: str, raw: str, source: str) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RefAlignInputError(f"{source}: {dotted}: {key} is not a section")
    node[keys[-1]] = _yaml(raw, source)


def load_training_config(path: str | Path | None = None, overrides=()) -> TrainingConfig:
    """The YAML file (if any) over the release defaults, then `overrides` ("train.lr=1.0e-4", values read as YAML).
    Every error names the file (or --set) and the key."""
    values: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = f"config {path}"
        if not path.is_file():
            raise RefAlignInputError(f"{source}: the file does not exist")
        with path.open("rb") as f:  # YAML reads the bytes as UTF-8 (or UTF-16/32 by BOM), whatever the locale
            values = _yaml(f, source) or {}
        if not isinstance(values, dict):
            raise RefAlignInputError(f"{source}: expected key: value pairs at the top level, got {describe(values)}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RefAlignInputError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1.0e-4")
        _set(values, key.strip(), raw, f"--set {item}")
    return parse_config(values, source + (" with --set" if overrides else ""))


RESUMABLE = ("train.max_steps", "train.checkpoint_every", "train.keep_last", "train.lr", "data.num_workers",
             "previews.")


def _flatten(values, prefix=""):
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], values


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(keys that changed and may, keys that changed and must not) between a checkpoint's config and this run's."""
    old, new = dict(_flatten(saved)), dict(_flatten(current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    allowed = [k for k in changed if k.startswith(RESUMABLE) and k in old and k in new]
    return allowed, [k for k in changed if k not in allowed]
