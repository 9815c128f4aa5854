"""The Hugging Face model card (``README.md``) of an exported CLoVE backbone.

Downstream numbers are the paper's (Silva, Pedrini, Ramírez Rivera, ICCV 2023 workshop), as summarised in
``docs/CLOVE_METHOD.md`` section 7; they belong to the authors' released checkpoints and are labelled with the
checkpoint they were measured on. Weights trained by this project carry their own recipe line and no claim of the
paper's numbers unless they are one of the released checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import ModelCard, ModelCardData

from clove_timm.registry import CLOVE_TAGS, LICENSE, ORIGIN_URL, PAPER_ID, PAPER_NAME

__all__ = ["REFERENCE_RECIPE", "CardFacts", "build_model_card"]

REFERENCE_RECIPE = (
    "CLoVE self-supervised pretraining on ImageNet-1k train (no labels): 2 global views at 224 px and 6 local views "
    "at 96 px per image (BYOL-style augmentation), EMA teacher (momentum 0.99 to 1, cosine), ranking loss with "
    "pos_ratio 0.7; LARS, base lr 1.0 x batch / 256 at global batch 2048, weight decay 2e-5, 5 warm-up epochs, "
    "cosine schedule, mixed precision, SyncBatchNorm"
)
"""The reference 4-GPU recipe of record (method doc sections 3 to 5)."""

# Paper, CLoVE 400 epochs, Detectron2 fine-tuning of all layers (method doc section 7).
_PAPER_RESULTS_400 = (
    ("COCO detection + instance seg.", "Mask R-CNN R50-C4, 1x", "AP_bb 41.0 / AP_mk 35.5"),
    ("COCO detection + instance seg.", "Mask R-CNN R50-FPN, 1x", "AP_bb 41.2 / AP_mk 37.1"),
    ("Cityscapes instance seg.", "Mask R-CNN R50-FPN, 24k iter", "AP 37.2"),
    ("LVIS v1 detection + instance seg.", "Mask R-CNN R50-FPN, 180k iter", "AP_bb 24.3 / AP_mk 23.9"),
    ("COCO keypoints", "Keypoint R-CNN R50-FPN, 90k iter", "AP 67.0"),
    ("VOC07+12 detection", "Faster R-CNN R50-C4, 24k iter", "AP 59.9"),
    ("COCO DensePose", "DensePose R-CNN R50-FPN, s1x", "AP_gps 66.3"),
)
_PAPER_NOTES = {
    400: "These are the paper's numbers for this checkpoint.",
    200: "For this 200-epoch checkpoint the paper reports VOC07+12 AP 60.1 (Faster R-CNN R50-C4); the table is the "
    "400-epoch checkpoint's, for comparison.",
    50: "This 50-epoch checkpoint is the one of the paper's ablations (Tables 8 to 11), which report VOC07 AP "
    "between 58.5 and 58.8 for the default configuration; the table is the 400-epoch checkpoint's, for comparison.",
}

_CITATION = """@inproceedings{silva2023clove,
  title     = {Self-supervised Learning of Contextualized Local Visual Embeddings},
  author    = {Silva, Thalles Santos and Pedrini, Helio and Ram{\\'i}rez Rivera, Ad{\\'i}n},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV) Workshops},
  pages     = {177--186},
  year      = {2023}
}"""


@dataclass(frozen=True)
class CardFacts:
    """What the card states about one exported backbone.

    Attributes:
        name: timm model name ``arch.tag``.
        repo_id: Hub repository the folder is meant for, ``org/name``.
        arch: timm architecture.
        epochs: pretraining epochs, ``None`` if unknown.
        dataset: Hub id of the pretraining data set.
        recipe: one-paragraph description of the pretraining recipe.
        branch: exported branch, ``"student"`` or ``"teacher"`` (or what a bare backbone recorded).
        source_layout: layout of the source checkpoint (see :mod:`clove_timm.checkpoint_io`).
        source_sha256: SHA-256 of the source checkpoint file.
        weights_sha256: SHA-256 of the exported ``model.safetensors``.
        param_count: number of backbone parameters.
        feature_channels: channels of the feature maps at strides 4, 8, 16, 32 (``out_indices=(1, 2, 3, 4)``).
        exporter_version: clove_timm version that wrote the folder.
    """

    name: str
    repo_id: str
    arch: str
    epochs: int | None
    dataset: str
    recipe: str
    branch: str
    source_layout: str
    source_sha256: str
    weights_sha256: str
    param_count: int
    feature_channels: tuple[int, ...]
    exporter_version: str


def _results_section(facts: CardFacts) -> str:
    released = CLOVE_TAGS.get(facts.name)
    if released is None:
        return (
            "## Downstream results\n\n"
            "This backbone was not evaluated by the paper. For the paper's numbers see the released checkpoints "
            "`resnet50.clove_in1k` (400 epochs), `resnet50.clove_ep200_in1k` and `resnet50.clove_ep50_in1k`.\n"
        )
    rows = "\n".join(f"| {task} | {model} | {score} |" for task, model, score in _PAPER_RESULTS_400)
    return (
        "## Downstream results (paper, 400-epoch checkpoint)\n\n"
        "Detectron2, all layers fine-tuned, SyncBN in the backbone.\n\n"
        f"| task | model, schedule | CLoVE 400 ep |\n|---|---|---|\n{rows}\n\n"
        f"{_PAPER_NOTES[released.epochs]}\n"
    )


def build_model_card(facts: CardFacts) -> ModelCard:
    """Build the model card of an exported CLoVE backbone.

    Args:
        facts: what to state about the backbone.

    Returns:
        A :class:`huggingface_hub.ModelCard` with metadata (library_name timm, pipeline_tag
        image-feature-extraction, licence, data set, tags) and a body covering recipe and epochs, the paper's
        downstream tables, loading, use with detectors, integrity and citation.
    """
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        license=LICENSE,
        datasets=[facts.dataset],
        tags=["timm", "image-feature-extraction", "self-supervised", "clove", "dense-prediction", facts.arch],
        model_name=facts.name,
    )
    epochs = f"{facts.epochs} epochs" if facts.epochs else "epochs not recorded"
    channels = ", ".join(str(c) for c in facts.feature_channels)
    registered = facts.name in CLOVE_TAGS
    tag_line = (
        f"# with clove_timm installed, the same weights by tag: timm.create_model('{facts.name}', pretrained=True)\n"
        if registered
        else ""
    )
    body = f"""
# {facts.name}

A {facts.arch} backbone pretrained with **CLoVE** (Contextualized Local Visual Embeddings), a self-supervised
method for dense prediction: {epochs} on `{facts.dataset}`. The weights are the backbone only (no classifier,
`num_classes=0`), in timm's parameter names, for fine-tuning on detection, segmentation and other dense tasks.

## Model details

- **Architecture:** timm `{facts.arch}` (torchvision-style ResNet v1.5 layout), {facts.param_count / 1e6:.1f} M
  parameters, no classifier.
- **Pretraining:** {facts.recipe}; {epochs}.
- **Exported branch:** {facts.branch} (the reference code releases the student backbone).
- **Input:** RGB, ImageNet mean/std normalisation, 224 px at pretraining.
- **Feature maps** (`features_only=True, out_indices=(1, 2, 3, 4)`): strides 4, 8, 16, 32 with {channels}
  channels.
- **Paper:** {PAPER_NAME} (Silva, Pedrini, Ramírez Rivera; ICCV 2023 workshop), {PAPER_ID}.
- **Original code:** {ORIGIN_URL} (licence {LICENSE.upper()}).

{_results_section(facts)}
## How to load

```python
import timm

model = timm.create_model('hf-hub:{facts.repo_id}', pretrained=True)  # timm alone
{tag_line}features = model.forward_features(images)  # (B, C, H/32, W/32)
```

Pin a revision for reproducible loads: `timm.create_model('hf-hub:{facts.repo_id}@<commit>', pretrained=True)`.
Offline: download the folder once (`hf download {facts.repo_id}`) and load with `HF_HUB_OFFLINE=1`, or
load a local copy with `timm.create_model('local-dir:/path/to/folder', pretrained=True)`.

## Use with detectors

```python
backbone = timm.create_model('hf-hub:{facts.repo_id}', pretrained=True,
                             features_only=True, out_indices=(1, 2, 3, 4))
c2, c3, c4, c5 = backbone(images)  # strides 4, 8, 16, 32
```

Detectron2, torchvision and mmdetection weight files are produced from this folder by
`python -m hub.export model.safetensors OUT_DIR --format detectron2|torchvision|mmdetection` (clove_timm). The
paper's transfer settings: RGB input, pixel mean [123.675, 116.28, 103.53] and std [58.395, 57.12, 57.375] (0-255
scale), `STRIDE_IN_1X1: False`, no frozen stages, SyncBN in the backbone.

## Files and integrity

- `model.safetensors` sha256: `{facts.weights_sha256}`
- source checkpoint ({facts.source_layout} layout) sha256: `{facts.source_sha256}`
- exported by clove_timm {facts.exporter_version}; `SHA256SUMS` lists every file of this folder.

## Citation

```bibtex
{_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
