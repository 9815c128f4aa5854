"""The CLoVE model wrapper: shapes, the teacher's behaviour and the EMA update."""

from __future__ import annotations

import pytest
import timm
import torch

from clove_timm.model import CLoVEModel


def _tiny(**kwargs):
    return CLoVEModel("resnet10t", proj_hidden_dim=32, embed_dim=16, num_heads=2, **kwargs)


def test_forward_shapes_and_normalization():
    model = _tiny()
    out = model(torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32))
    assert out.student_global.shape == (4, 16, 2, 2)
    assert out.student_local.shape == (6, 16, 1, 1)
    assert out.teacher_global.shape == (4, 16, 2, 2)
    for x in (out.student_global, out.student_local, out.teacher_global):
        torch.testing.assert_close(x.norm(dim=1), torch.ones_like(x[:, 0]))
    assert out.attention is None
    assert not out.teacher_global.requires_grad and out.student_global.requires_grad


def test_attention_only_when_asked():
    out = _tiny()(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32), return_attention=True)
    assert out.attention["global"].shape == (2, 2, 4, 4)
    assert out.attention["local"].shape == (2, 2, 1, 1)


def test_state_dict_uses_timm_names_under_prefixes():
    model = _tiny()
    keys = model.state_dict().keys()
    timm_keys = timm.create_model("resnet10t", num_classes=0, global_pool="").state_dict().keys()
    assert {k.removeprefix("student.backbone.") for k in keys if k.startswith("student.backbone.")} == set(timm_keys)
    assert {k.removeprefix("teacher.backbone.") for k in keys if k.startswith("teacher.backbone.")} == set(timm_keys)
    assert "predictor.in_proj_weight" in keys and "student.projector.linear1.weight" in keys
    assert not any(k.startswith("teacher.") and "predictor" in k for k in keys)


def test_teacher_starts_equal_gets_no_gradient_and_uses_batch_statistics():
    model = _tiny()
    for s, t in zip(model.student.parameters(), model.teacher.parameters(), strict=True):
        assert torch.equal(s, t) and not t.requires_grad and s.requires_grad
    images = torch.randn(4, 3, 64, 64)
    out = model(images, None)
    loss = out.student_global.sum() + out.teacher_global.sum()
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    # Train mode: BN uses batch statistics, so the teacher map of an image depends on the rest of the batch.
    alone = model(images[:1], None).teacher_global
    assert not torch.allclose(alone, out.teacher_global[:1], atol=1e-4)


def test_update_teacher_is_an_ema_of_parameters_not_buffers():
    model = _tiny()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    buffers_before = {k: b.clone() for k, b in model.teacher.named_buffers()}
    student_buffers = dict(model.student.named_buffers())
    with torch.no_grad():
        for b in student_buffers.values():
            b.add_(3)
    model.update_teacher(0.9)
    for t0, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    for k, b in model.teacher.named_buffers():
        assert torch.equal(b, buffers_before[k]), k
    frozen = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.teacher.parameters(), strict=True))
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_reference_attention_mode_and_errors():
    model = _tiny(normalize_qk=False)
    assert not model.predictor.normalize_qk
    with pytest.raises(ValueError, match="global_views"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="backbone_kwargs"):
        CLoVEModel(timm.create_model("resnet10t", num_classes=0, global_pool=""), backbone_kwargs={"drop_rate": 0.1})
