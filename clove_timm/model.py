"""The CLoVE model: a timm backbone with projector and predictor (student), and its EMA teacher.

Symbols used in this module:
    B: images in the batch. G: global views per image. N: local views per image.
    C: embedding channels. Hg, Wg / Hl, Wl: map size of a global / local view.
    h: attention heads; Lg = Hg * Wg, Ll = Hl * Wl.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from clove_timm.heads import Predictor, Projector

__all__ = ["CLoVEModel", "CLoVEOutput", "StudentTeacherBranch"]


@dataclass
class CLoVEOutput:
    """What one forward pass returns; every map is L2-normalized over C.

    Attributes:
        student_global: (G*B, C, Hg, Wg) contextualized student maps of the global views (view-major rows).
        student_local: (N*B, C, Hl, Wl) contextualized student maps of the local views, or None when N = 0.
        teacher_global: (G*B, C, Hg, Wg) teacher maps of the global views.
        attention: predictor attention weights, only when asked: ``{"global": (G*B, h, Lg, Lg),
            "local": (N*B, h, Ll, Ll)}``.
    """

    student_global: torch.Tensor
    student_local: torch.Tensor | None
    teacher_global: torch.Tensor
    attention: dict[str, torch.Tensor] | None = None


class StudentTeacherBranch(nn.Module):
    """Backbone followed by the projector; the part that the teacher copies.

    Args:
        backbone: a timm model built with ``num_classes=0, global_pool=''`` (its ``forward_features`` gives maps).
        projector: the per-location projector.
    """

    def __init__(self, backbone: nn.Module, projector: Projector) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Project the backbone map of a batch of images.

        Args:
            images: (B, 3, H, W) normalized images.

        Returns:
            (B, C, H/s, W/s) projected map, s the backbone's output stride (32 for ResNets).
        """
        return self.projector(self.backbone.forward_features(images))


class CLoVEModel(nn.Module):
    """Student (backbone + projector + predictor) and EMA teacher (backbone + projector) of CLoVE.

    The backbone is any timm model with a spatial ``forward_features`` (method doc section 2; the paper uses
    ResNet-50). Parameter names are timm's, under ``student.backbone.`` and ``teacher.backbone.``, so exporting
    the backbone is a prefix strip and a strict load.

    The teacher follows the reference's behaviour: it is a copy of the student's backbone and projector, receives
    no gradient, sees only the global views, and runs in the same mode as the whole model, so in training its
    BatchNorm layers use batch statistics (and keep their own running statistics). :meth:`update_teacher` moves its
    parameters, not its BatchNorm buffers, towards the student's.

    Deviation from the reference: the reference updates the teacher inside ``forward`` before the teacher pass; here
    ``forward`` is a pure function of inputs and parameters, and the training loop calls :meth:`update_teacher` after
    every optimizer step (the same sequence of updates, without hidden state changes in ``forward``).

    Args:
        backbone: timm model name (e.g. ``"resnet50"``) or a timm model built with ``num_classes=0, global_pool=''``.
        pretrained_backbone: load timm's pretrained weights into the backbone (only when ``backbone`` is a name).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        proj_hidden_dim: projector hidden channels (method doc: 4096).
        embed_dim: embedding channels C (method doc: 256).
        num_heads: predictor heads (paper: 8).
        normalize_qk: NMHSA predictor (paper) when True, ``nn.MultiheadAttention`` (reference code) when False.
        attn_temperature: NMHSA softmax temperature (reference config ``attn_temp``: 0.2).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        *,
        pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        proj_hidden_dim: int = 4096,
        embed_dim: int = 256,
        num_heads: int = 8,
        normalize_qk: bool = True,
        attn_temperature: float = 0.2,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = timm.create_model(
                backbone, pretrained=pretrained_backbone, num_classes=0, global_pool="", **(backbone_kwargs or {})
            )
        elif pretrained_backbone or backbone_kwargs:
            raise ValueError("pretrained_backbone and backbone_kwargs apply only when backbone is a timm model name")
        if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_features"):
            raise TypeError(f"backbone must be a timm model with forward_features/num_features, got {type(backbone)}")
        projector = Projector(backbone.num_features, proj_hidden_dim, embed_dim)
        self.student = StudentTeacherBranch(backbone, projector)
        self.predictor = Predictor(embed_dim, num_heads, normalize_qk=normalize_qk, temperature=attn_temperature)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

    def _contextualize(self, images: torch.Tensor, return_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        projected = self.student(images)
        if return_attention:
            out, attention = self.predictor(projected, return_attention=True)
        else:
            out, attention = self.predictor(projected), None
        return F.normalize(out, dim=1), attention

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> CLoVEOutput:
        """Student maps of all views and teacher maps of the global views.

        The global views go through the student in one backbone call and the local views in another, as in the
        reference (BatchNorm statistics are per call).

        Args:
            global_views: (G*B, 3, Sg, Sg) global views, view-major (row ``v * B + b``).
            local_views: (N*B, 3, Sl, Sl) local views, view-major, or None.
            return_attention: also return the predictor attention weights (costs memory; for logging steps).

        Returns:
            The L2-normalized maps, see :class:`CLoVEOutput`.
        """
        if global_views.ndim != 4:
            raise ValueError(f"global_views must have shape (G*B, 3, H, W), got {tuple(global_views.shape)}")
        if local_views is not None and (local_views.ndim != 4 or local_views.shape[0] == 0):
            raise ValueError(f"local_views must have shape (N*B, 3, h, w) with N*B > 0, got {tuple(local_views.shape)}")
        student_global, attn_global = self._contextualize(global_views, return_attention)
        student_local, attn_local = (None, None)
        if local_views is not None:
            student_local, attn_local = self._contextualize(local_views, return_attention)
        with torch.no_grad():
            teacher_global = F.normalize(self.teacher(global_views), dim=1)
        attention = None
        if return_attention:
            attention = {"global": attn_global}
            if attn_local is not None:
                attention["local"] = attn_local
        return CLoVEOutput(student_global, student_local, teacher_global, attention)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step ``teacher = momentum * teacher + (1 - momentum) * student`` on parameters, in one foreach op.

        Call it after each optimizer step. BatchNorm buffers are not averaged (reference ``_update_momentum_encoder``
        iterates ``parameters()`` only).

        Args:
            momentum: EMA momentum in [0, 1] (see :func:`clove_timm.schedules.teacher_momentum`).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
