"""Bad input to training configs, datasets and sample prompts (all checked before anything is built): one clear error
each, before any output (`bad_input.py`)."""

from refalign_core.errors import RefAlignInputError
from refalign_core.training import load_training_config, train
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_folder, read_jsonl, read_opens2v
from refalign_core.training.previews import read_sample_prompts

from bad_input import Case, TOY_MODELS, api, table_test, write

CASES = [
    # training config and datasets (all checked before anything is built)
    *[Case(f"config {text}", api(lambda i, o, text=text: load_training_config(write(o.parent / "c.yaml", text))),
           RefAlignInputError, key)
      for key, text in [("train.lr", "train: {lr: 1e-4}"), ("train.lr", "train: {lr: -1.0}"),
                        ("train.lr", "train: {lr: .nan}"), ("train.checkpoint_every", "train: {checkpoint_every: 0}"),
                        ("train.grad_accum", "train: {grad_accum: 0}"), ("train.mode", "train: {mode: LoRA}"),
                        ("train.mode", "train: {mode: fulll}"), ("train.learning_rate", "train: {learning_rate: 1}"),
                        ("train.batch_size", "train: {batch_size: 2.5}"), ("data.fps", "data: {fps: 0}"),
                        ("train.ema_decay", "train: {ema_decay: 1.5}"), ("data", "data: 5"),
                        ("model.dit_config", "model: {dit: a.safetensors, dit_config: {num_layers: 2}}"),
                        ("distill", "train: {mode: lora}\nalignment: {enabled: false}\n"
                                    "dropout: {text: 0.0, references: 0.0, both: 0.0}\n"
                                    "distill: {enabled: true, teacher_steps: 20000}")]],
    *[Case(f"train without model.{key}", api(lambda i, o, key=key: train(load_training_config(None, [
        m for m in TOY_MODELS if not m.startswith(f"model.{key}=")]), o / "run")), RefAlignInputError, f"model.{key}")
      for key in ("dit", "vae", "text_encoder")],
    Case("train vae missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f"model.vae={i}/none.safetensors"]), o / "run")), RefAlignInputError, "model.vae"),
    Case("train dataset missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f'data.datasets=[{{path: "{i}/none.jsonl"}}]']), o / "run")), RefAlignInputError, "data.datasets[0].path"),
    Case("train output under a file", api(lambda i, o: train(load_training_config(None, TOY_MODELS),
                                                             i / "a_file" / "run")), RefAlignInputError, "a_file"),
    Case("train previews prompts missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f"previews.prompts={i}/none.txt"]), o / "run")), RefAlignInputError, "previews.prompts"),
    Case("config not YAML", api(lambda i, o: load_training_config(write(o.parent / "c.yaml", "a: [b"))),
         RefAlignInputError, "YAML"),
    Case("config missing", api(lambda i, o: load_training_config(i / "none.yaml")), RefAlignInputError, "none.yaml"),
    Case("dataset manifest missing", api(lambda i, o: read_jsonl(i / "none.jsonl", SkipCounter())),
         RefAlignInputError, "none.jsonl"),
    Case("dataset folder without references", api(lambda i, o: read_folder(i / "empty_dataset", SkipCounter())),
         RefAlignInputError, "references/"),
    Case("dataset OpenS2V JSON broken", api(lambda i, o: list(read_opens2v(i / "not.json", None, None,
                                                                           SkipCounter()))),
         RefAlignInputError, "not.json"),
    Case("sample prompts bad size", api(lambda i, o: read_sample_prompts(i / "prompts.txt", 5.0)),
         RefAlignInputError, "prompts.txt:1"),
]


test_bad_input_is_one_clear_error_before_any_output = table_test(CASES, 10)
