"""Export a CLoVE pretraining checkpoint: ``python -m hub.export SRC OUT_DIR [options]``.

SRC is a pretraining checkpoint directory (``model.safetensors`` inside), a ``.safetensors`` file, or a checkpoint
file of the reference code (a pickle, loaded with nothing but tensors and ``argparse.Namespace`` allowed). OUT_DIR
is created: a Hub-ready timm folder (``--format timm``, default) or a folder with one Detectron2 / torchvision /
mmdetection weight file. See ``docs/weights.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clove_timm.export import EXPORT_FORMATS, ExportVerificationError, export_checkpoint
from clove_timm.registry import HF_ORG_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint directory, .safetensors file or reference .pth")
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="timm", help="output format (default: timm)")
    parser.add_argument(
        "--branch", choices=("student", "teacher"), default=None, help="backbone to export (default: student)"
    )
    parser.add_argument("--name", default="resnet50.clove_in1k", help="timm model name arch.tag (default: %(default)s)")
    parser.add_argument("--arch", default=None, help="timm architecture (default: the part of --name before the dot)")
    parser.add_argument("--org", default=None, help=f"Hub organisation for the model card (default: ${HF_ORG_ENV})")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs, for the model card")
    parser.add_argument("--dataset", default="imagenet-1k", help="pretraining data set Hub id, for the model card")
    parser.add_argument("--recipe", default=None, help="recipe paragraph for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns the process exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = {"branch": args.branch, "name": args.name, "arch": args.arch, "overwrite": args.overwrite}
    if args.format == "timm":
        kwargs |= {"org": args.org, "epochs": args.epochs, "dataset": args.dataset, "recipe": args.recipe}
    try:
        out_dir = export_checkpoint(args.src, args.out_dir, format=args.format, **kwargs)
    except (ValueError, OSError, ExportVerificationError) as error:
        # ValueError covers UnsafeCheckpointError and CheckpointFormatError; OSError a missing SRC or a used OUT_DIR.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
