"""``opendaam toyworld``: render scenes of the procedural urban world; train the toy-urban model."""

from __future__ import annotations

import json
from pathlib import Path

from opendaam.cli._checks import MAX_SEED, check_model, check_output_dir, in_range

__all__ = ["add_parser", "run_render", "run_train", "run_train_annotator"]


def add_parser(sub) -> None:
    """Register ``toyworld render`` and ``toyworld train``.

    Examples:
        >>> import argparse
        >>> root = argparse.ArgumentParser()
        >>> add_parser(root.add_subparsers(dest="command"))
        >>> root.parse_args(["toyworld", "render", "--seed", "3", "--out", "x"]).seed
        [3]
    """
    p = sub.add_parser("toyworld", help="the procedural urban world and its model", description=__doc__)
    inner = p.add_subparsers(dest="action", required=True)
    r = inner.add_parser("render", help="write a scene's image, label map and caption")
    r.add_argument("--seed", type=int, nargs="+", default=[0],
                   help=f"scene seeds, 0 .. {MAX_SEED}; one scene each (default: 0)")
    r.add_argument("--class", dest="cls", default=None, help="force the main object's class")
    r.add_argument("--out", required=True, help="output folder for <seed>.png, labels, colours and captions")
    r.set_defaults(run=run_render)
    t = inner.add_parser("train", help="train toy-urban (resumes from the checkpoints in --out)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, logs and the final pipeline")
    t.add_argument("--threads", type=int, default=1, help="torch threads, >= 1")
    t.add_argument("--unet-steps", type=int, default=None, help="U-Net training steps (default: the recipe's)")
    t.add_argument("--vae-steps", type=int, default=None, help="autoencoder training steps (default: the recipe's)")
    t.add_argument("--scenes", type=int, default=None, help="training scenes rendered (default: the recipe's)")
    t.add_argument("--decay-start", type=int, default=None,
                   help="U-Net step from which the learning rates fall linearly to 0 at --unet-steps")
    t.add_argument("--lookalike-share", type=float, default=None,
                   help="share of scenes whose main object is a bus, truck or traffic sign (default 0.3)")
    t.add_argument("--minutes", type=float, default=None,
                   help="pause after this many minutes (checkpointed); rerun the same command to resume")
    t.set_defaults(run=run_train)
    a = inner.add_parser("train-annotator", help="train the segmentation net that labels generated images")
    a.add_argument("--out", required=True, help="folder for model.safetensors and config.json")
    a.add_argument("--pipeline", default="toy-urban", help="pipeline whose autoencoder blurs half the scenes")
    a.add_argument("--steps", type=int, default=600, help="training steps, >= 1")
    a.add_argument("--threads", type=int, default=1, help="torch threads, >= 1")
    a.set_defaults(run=run_train_annotator)


def _usage_error(action: str, message: str) -> SystemExit:
    """Print the one-line error and return a ``SystemExit`` with exit code 2 (bad input) carrying the message."""
    import sys

    print(f"opendaam toyworld {action}: error: {message}", file=sys.stderr)
    error = SystemExit(message)
    error.code = 2
    return error


def run_render(args) -> int:
    """Write ``<seed>.png``, ``<seed>_labels.png`` (Cityscapes ids), ``<seed>_color.png`` and captions.

    Examples:
        >>> import argparse, tempfile
        >>> run_render(argparse.Namespace(seed=[1, 2], cls=None, out=tempfile.mkdtemp()))  # doctest: +ELLIPSIS
        wrote 2 scenes to ...
        0
    """
    from PIL import Image

    from opendaam.toyworld.scene import colorize_labels, render_scene

    for seed in args.seed:
        in_range("--seed", seed, 0, MAX_SEED, integer=True)
    out = check_output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for seed in args.seed:
        try:
            scene = render_scene(seed, cls=args.cls)
        except ValueError as err:
            raise _usage_error("render", f"--class: {err}") from None
        scene.pil().save(out / f"{seed}.png")
        Image.fromarray(scene.labels).save(out / f"{seed}_labels.png")
        Image.fromarray(colorize_labels(scene.labels)).save(out / f"{seed}_color.png")
        captions[str(seed)] = {"caption": scene.caption, "class": scene.cls}
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    print(f"wrote {len(args.seed)} scenes to {out}")
    return 0


def run_train(args) -> int:
    """Train or resume (``opendaam toyworld train --out DIR [--minutes M] [--threads 1]``).

    Examples:
        >>> import argparse
        >>> run_train(argparse.Namespace(out="run", threads=1, unet_steps=None, vae_steps=None,
        ...                              scenes=None, minutes=30))  # doctest: +SKIP
    """
    from dataclasses import replace

    for option, value in (("--threads", args.threads), ("--unet-steps", args.unet_steps),
                          ("--vae-steps", args.vae_steps), ("--scenes", args.scenes),
                          ("--decay-start", getattr(args, "decay_start", None))):
        in_range(option, value, 1, integer=True)
    in_range("--minutes", getattr(args, "minutes", None), 0, low_open=True)
    check_output_dir(args.out)
    from opendaam.toyworld.scene import WorldConfig
    from opendaam.toyworld.train import TrainConfig, train

    overrides = {k: v for k, v in dict(unet_steps=args.unet_steps, vae_steps=args.vae_steps, scenes=args.scenes,
                                       decay_start=getattr(args, "decay_start", None)).items() if v is not None}
    share = getattr(args, "lookalike_share", None)
    try:
        world = WorldConfig() if share is None else WorldConfig(lookalike_share=share)
    except ValueError as err:
        raise _usage_error("train", f"--lookalike-share: {err}") from None
    final = train(args.out, replace(TrainConfig(), **overrides), threads=args.threads,
                  minutes=getattr(args, "minutes", None), world=world)
    print(f"saved the pipeline to {final}" if final else f"paused; rerun the same command to resume ({args.out})")
    return 0


def run_train_annotator(args) -> int:
    """Train the segmentation annotator and print its per-class IoU on held-out rendered scenes.

    Examples:
        >>> import argparse
        >>> run_train_annotator(argparse.Namespace(out="ann", pipeline="toy-urban", steps=600,
        ...                                        threads=1))  # doctest: +SKIP
    """
    in_range("--steps", args.steps, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    check_output_dir(args.out)
    check_model(args.pipeline, option="--pipeline")
    import torch

    from opendaam.models import load_pipeline
    from opendaam.toyworld.annotate import HELD_OUT_ANNOTATOR, evaluate_annotator, train_annotator

    torch.set_num_threads(args.threads)
    vae = load_pipeline(args.pipeline).vae.float().eval()
    net = train_annotator(args.out, vae=vae, steps=args.steps, threads=args.threads)
    seeds = range(HELD_OUT_ANNOTATOR, HELD_OUT_ANNOTATOR + 256)
    report = {"rendered": evaluate_annotator(net, seeds), "autoencoded": evaluate_annotator(net, seeds, vae)}
    (Path(args.out) / "iou.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0
