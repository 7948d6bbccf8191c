"""RefAlign training: the alignment loss, the typed config, datasets and buckets, the feature cache, checkpoints,
previews and the loop (`train`). Inference (`refalign_core` top level) imports nothing from here."""

from .config import TrainingConfig, load_training_config, parse_config
from .loop import TrainingResult, train
from .module import LORA_TARGETS, RefAlignTrainingModule, TrainingBatch, lora_state_dict_for_comfyui, \
    make_training_batch

__all__ = ["LORA_TARGETS", "RefAlignTrainingModule", "TrainingBatch", "TrainingConfig", "TrainingResult",
           "load_training_config", "lora_state_dict_for_comfyui", "make_training_batch", "parse_config", "train"]
