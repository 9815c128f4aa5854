"""The end-to-end demo: pretrain CLoVE on the built-in procedural images, export, load through timm, probe.

    python -m training.demo                      # the `demo` recipe, a few minutes on 2 CPU cores
    python -m training.demo epochs=8 output_dir=runs/demo8

Steps: (1) ``training.pretrain`` with the ``demo`` recipe (plus any ``key=value`` overrides); (2) the exported
student backbone is loaded with ``timm.create_model('local-dir:<output_dir>/export', pretrained=True)``;
(3) a frozen dense linear probe (per-pixel linear classifier, :mod:`training.probe`) is trained on generated
images and scored on held-out generated images, for the pretrained backbone and for the same architecture at
random initialisation; the table is printed and saved to ``<output_dir>/probe.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import timm
import torch

from training.config import load_config
from training.pretrain import main as pretrain
from training.probe import dense_linear_probe, format_probe_table
from training.procedural import ProceduralImages


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo", help="pretraining recipe (default: demo)")
    parser.add_argument("--probe-train-images", type=int, default=256)
    parser.add_argument("--probe-test-images", type=int, default=128)
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--probe-batch-size", type=int, default=32)
    parser.add_argument("--probe-lr", type=float, default=0.05)
    parser.add_argument("overrides", nargs="*", help="pretraining config overrides as key=value")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the demo; returns the probe scores keyed by backbone."""
    args = parse_args(argv)
    config = load_config(args.recipe, args.overrides)
    started = time.perf_counter()
    result = pretrain(["--recipe", args.recipe, *args.overrides])
    pretrain_s = time.perf_counter() - started

    # The probe data: other seeds than the pretraining images, so the probe is scored on unseen images.
    probe_data = dict(image_size=config.procedural_image_size, num_classes=config.procedural_classes)
    train_set = ProceduralImages(args.probe_train_images, seed=config.seed + 1001, **probe_data)
    test_set = ProceduralImages(args.probe_test_images, seed=config.seed + 2002, **probe_data)
    arch = config.export_name.split(".")[0]
    backbones = {
        "CLoVE pretrained (local-dir export)": timm.create_model(
            f"local-dir:{result.export_dir}", pretrained=True, **config.backbone_kwargs
        ),
    }
    torch.manual_seed(config.seed)
    backbones["random init"] = timm.create_model(arch, pretrained=False, num_classes=0, **config.backbone_kwargs)

    rows = {}
    for label, backbone in backbones.items():
        rows[label] = dense_linear_probe(
            backbone,
            train_set,
            test_set,
            image_size=config.procedural_image_size,
            epochs=args.probe_epochs,
            batch_size=args.probe_batch_size,
            lr=args.probe_lr,
            seed=config.seed,
            num_classes=config.procedural_classes,
        )
    total_s = time.perf_counter() - started
    report = {
        "scores": rows,
        "pretrain_steps": result.step,
        "pretrain_seconds": round(pretrain_s, 1),
        "total_seconds": round(total_s, 1),
    }
    (result.export_dir.parent / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nFrozen dense linear probe on {args.probe_test_images} held-out procedural images ({arch}):")
    print(format_probe_table(rows))
    print(f"pretraining: {result.step} steps in {pretrain_s:.0f} s; demo total {total_s:.0f} s")
    return rows


if __name__ == "__main__":
    main()
