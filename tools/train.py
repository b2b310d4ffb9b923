#!/usr/bin/env python
"""Train and evaluate a composed-retrieval model.

    python tools/train.py --dataset css                       # built-in CSS benchmark, TIRG
    python tools/train.py --dataset css --preset smoke        # about a minute
    python tools/train.py --dataset css --ga adversarial,isotropic --set loss.eta=0.001
    python tools/train.py --config configs/css.yaml --set train.steps=500 --out runs/try
    python tools/train.py --dataset mitstates --data-root DIR --image-weights PRESET_DIR
    python tools/train.py --dataset fashion200k --data-root DIR --image-weights PRESET_DIR
    python tools/train.py --dataset fashioniq --data-root DIR --clip-preset CLIP_PRESET_DIR   # Combiner
    python tools/train.py --import my_composer --method my_composer   # a composer of your own

Config layers, later wins: the dataclass defaults, configs/<dataset>.yaml (or --config), the
preset (configs/presets/<name>.yaml), the flags below, then every --set section.key=value.
"""

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    from keras_irtf import cli
    from keras_irtf.config import choices

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--dataset", choices=cli.names("dataset"), help="dataset (default config: configs/<dataset>.yaml)")
    p.add_argument("--config", action="append", default=[], help="YAML config file(s), applied in order")
    p.add_argument("--preset", help="configs/presets/<name>.yaml applied on top (e.g. smoke)")
    p.add_argument("--method", choices=cli.names("composer"), help="composer (model.composer)")
    p.add_argument("--ga", help=f"comma-separated GA methods: {','.join(cli.names('ga_method'))} (or none)")
    p.add_argument("--data-root", help="dataset folder in its official layout")
    p.add_argument("--image-encoder", choices=cli.names("image_encoder"), help="image encoder (model.image_encoder)")
    p.add_argument("--text-encoder", choices=cli.names("text_encoder"), help="text encoder (model.text_encoder)")
    p.add_argument("--image-weights", metavar="PRESET_DIR",
                   help="local keras-hub preset folder (e.g. resnet_18_imagenet) for a pretrained ResNet-18; "
                        "implies --image-encoder resnet18")
    p.add_argument("--clip-preset", metavar="PRESET_DIR",
                   help="local keras-hub CLIP or SigLIP preset folder for the clip / siglip encoders (model.clip_preset)")
    p.add_argument("--css-images", choices=["auto", "png", "2d"], help="CSS: read PNGs or draw scenes in 2D")
    p.add_argument("--out", help="run folder (default runs/<dataset>_<method>[_ga][_<preset>]_s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in the run folder")
    p.add_argument("--fresh", action="store_true",
                   help="discard the run folder's backup and start over (instead of resuming it)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--strategy", choices=choices("train.strategy"),
                   help="tf.distribute strategy (multi_worker reads the cluster from TF_CONFIG)")
    p.add_argument("--devices", help="devices for mirrored: 'cpu:N' (N logical CPUs) or '/gpu:0,/gpu:1'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.steps=500 or model.image_encoder.weights=DIR")
    return p.parse_args(argv)


def resolve_config(args):
    from keras_irtf.config import ConfigError, load_config, repo_configs_dir

    configs = repo_configs_dir()
    paths = list(args.config)
    if not paths:
        dataset = args.dataset or "css"
        default = configs / f"{dataset}.yaml"
        if default.is_file():
            paths = [default]
        elif not args.dataset:
            raise ConfigError(f"no config {default}")
        # a registered dataset without a config of its own starts from the defaults
    if args.preset:
        preset = configs / "presets" / f"{args.preset}.yaml"
        if not preset.is_file():
            known = sorted(p.stem for p in (configs / "presets").glob("*.yaml"))
            raise ConfigError(f"unknown preset {args.preset!r}; expected one of {known}")
        paths.append(preset)
    overrides = [f"train.preset={args.preset}"] if args.preset else []
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    if args.method:
        overrides.append(f"model.composer={args.method}")
    if args.ga is not None:
        overrides.append(f"ga.methods={args.ga}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.image_encoder:
        overrides.append(f"model.image_encoder={args.image_encoder}")
    if args.text_encoder:
        overrides.append(f"model.text_encoder={args.text_encoder}")
    if args.image_weights:
        if not args.image_encoder:
            overrides.append("model.image_encoder=resnet18")
        overrides.append(f"model.image_encoder.weights={args.image_weights}")
    if args.clip_preset:
        overrides.append(f"model.clip_preset={args.clip_preset}")
    if args.css_images:
        overrides.append(f"data.dataset.images={args.css_images}")
    if args.out:
        overrides.append(f"train.out={args.out}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.devices:
        overrides.append(f"train.devices={args.devices}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return load_config(paths, overrides + list(args.set))


def resume_command(argv) -> str:
    """This command as it was run, less --fresh and --overwrite: what resumes an interrupted run."""
    from keras_irtf import cli

    script = sys.argv[0] if argv is None else __file__
    return cli.command_line(script, sys.argv[1:] if argv is None else argv, drop=("--fresh", "--overwrite"))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a container stop), raised where Ctrl-C would be."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None):
    args = parse_args(argv)
    from keras_irtf.config import ConfigError
    from keras_irtf.data.base import DatasetError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)  # stop like Ctrl-C: one line, the backup kept
    cfg = None
    try:
        cfg = resolve_config(args)
        from keras_irtf.experiment import Experiment

        Experiment(cfg).check()  # a missing download or preset fails here, before any training work
        from keras_irtf.training.loop import format_results, train

        run, metrics = train(cfg, verbose=0 if args.quiet else 1, overwrite=args.overwrite, fresh=args.fresh)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not a traceback; the backup makes it resumable
        from keras_irtf import cli
        from keras_irtf.run_folder import interrupted_message

        run = None
        if cfg is not None:
            from keras_irtf.training.loop import run_dir_for

            run = run_dir_for(cfg)
        terminated = isinstance(e, Terminated) or getattr(e, "signal_name", "") == "SIGTERM"
        stopped_at = getattr(e, "step", None)  # a TrainingInterrupted names the step it backed up
        message = interrupted_message(run, "stopped by SIGTERM" if terminated else "interrupted", stopped_at,
                                      resume_command(argv))
        print(f"\n{message}", file=sys.stderr)
        # Python's own exit would first free the input pipelines, which can take a minute (cli.exit_now)
        cli.exit_now(143 if terminated else 130)
    except Exception as e:
        from keras_irtf.training.backup import BackupWriteError, TrainingDiverged, describe_os_error

        if isinstance(e, TrainingDiverged):
            print(f"error: {e}", file=sys.stderr)
            return 3
        if isinstance(e, BackupWriteError):
            print(f"error: {e}", file=sys.stderr)
            return 5
        if isinstance(e, OSError) and cfg is not None:  # e.g. a full disk while saving the model
            from keras_irtf.training.loop import run_dir_for
            from keras_irtf.run_folder import interrupted_message

            where = getattr(e, "filename", None) or run_dir_for(cfg)
            print(f"error: writing {where} failed ({describe_os_error(e)}); "
                  f"{interrupted_message(run_dir_for(cfg), 'stopped', resume_command=resume_command(argv))}",
                  file=sys.stderr)
            return 5
        from keras_irtf.training.distribute import collective_failure_message
        from keras_irtf.training.loop import run_dir_for

        message = collective_failure_message(e, cfg.train.collective_timeout_seconds, run_dir_for(cfg)) if cfg else None
        if message:
            print(f"error: {message}", file=sys.stderr)
            return 4
        raise
    if metrics is None:  # a non-chief worker of a multi-worker run
        print(f"worker done; the chief writes {run}")
        return 0
    print(f"\nrun: {run}  ({metrics['steps']} steps, {metrics['train_seconds']:.0f} s training)")
    print(format_results(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
