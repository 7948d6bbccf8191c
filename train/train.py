"""RefAlign training from the command line; the work is `refalign_core.training.train`.

    python train/train.py --config train/configs/tiny.yaml --output-dir OUT [--max-steps N] [--resume]
    python train/train.py --config my.yaml --output-dir OUT --set train.lr=1.0e-5 --set train.batch_size=2
    accelerate launch --config_file train/accelerate/ddp.yaml train/train.py --config ... --output-dir ...

The config file overrides the release recipe's defaults (`refalign_core/training/config.py`); `--print-config`
shows the whole effective config. Outputs: see `refalign_core/training/loop.py`."""

import argparse
import logging
import sys

import yaml

from refalign_core.errors import RefAlignInputError, run_command
from refalign_core.training import load_training_config, train


def _run(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file over the release defaults")
    parser.add_argument("--output-dir", help="where checkpoints, logs and the trained weights go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. train.lr=1.0e-5 (repeatable)")
    parser.add_argument("--max-steps", type=int, help="same as --set train.max_steps=N")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--cache-only", action="store_true", help="build the feature cache and stop")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    config = load_training_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    if not args.output_dir:
        raise RefAlignInputError("--output-dir is required")
    train(config, args.output_dir, resume=args.resume, cache_only=args.cache_only)
    return 0


def main(argv=None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
