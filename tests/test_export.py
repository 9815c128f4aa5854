"""Export: reference and project checkpoints to the timm Hub folder and to Detectron2 / torchvision / mmdetection,
and refusal of malicious pickles with nothing executed and nothing written."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import ModelCard
from torch import nn

import clove_timm
from clove_timm.checkpoint_io import CheckpointFormatError, UnsafeCheckpointError, load_source_checkpoint
from clove_timm.export import (
    ExportVerificationError,
    export_detectron2,
    export_mmdetection,
    export_timm_folder,
    export_torchvision,
    prepare_backbone,
)
from hub import export as export_cli
from tests.hub_fixtures import write_clove_checkpoint_dir

LAYOUT = Path(__file__).parent / "fixtures" / "official_checkpoint_layout.json"
TEACHER_VALUE = 0.5  # every floating teacher tensor of the synthetic reference checkpoint


def _synthesise_reference_state(seed: int) -> dict[str, torch.Tensor]:
    """Tensors with the reference layout's names, shapes and dtypes: a random student encoder, a constant teacher.

    Constant tensors are stored as stride-0 views of one element (torch.save keeps the one-element storage), which
    keeps the file at the size of one ResNet-50.
    """
    layout = json.loads(LAYOUT.read_text())["model_state_dict"]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, spec in layout.items():
        shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
        if not dtype.is_floating_point:
            state[key] = torch.tensor(1000, dtype=dtype).expand(shape)
        elif key.startswith("module.encoder."):
            if key.endswith("running_var"):
                state[key] = 0.5 + torch.rand(shape, generator=generator)
            elif key.endswith(("bn1.weight", "bn2.weight", "bn3.weight")) or ".downsample.1.weight" in key:
                state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
            else:
                fan_in = max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else 10
                state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.tensor(TEACHER_VALUE).expand(shape)
    return state


def _reference_checkpoint(state: dict[str, torch.Tensor], **extra) -> dict:
    opt = argparse.Namespace(arch="resnet50", model="CLoVE", epochs=400, lr_decay_epochs=[120, 160, 200], resume="")
    return {
        "opt": opt,
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 8.0, "momentum": 0.9, "params": [0, 1]}]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
        "epoch": 400,
        **extra,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A checkpoint file as the reference code's save_checkpoint writes it, and its state dict."""
    state = _synthesise_reference_state(seed=0)
    path = tmp_path_factory.mktemp("reference") / "ckpt_epoch_400.pth"
    torch.save(_reference_checkpoint(state), path)
    return path, state


@pytest.fixture(scope="module")
def reference_export(reference, tmp_path_factory):
    path, _ = reference
    return export_timm_folder(path, tmp_path_factory.mktemp("out") / "resnet50.clove_in1k")


@pytest.fixture(scope="module")
def project_checkpoint(tmp_path_factory):
    """A pretraining checkpoint directory of this project (CLoVEModel keys) for resnet18, with a pickle beside it."""
    directory = tmp_path_factory.mktemp("project") / "checkpoint_3"
    branches = write_clove_checkpoint_dir(directory, arch="resnet18", seed=5)
    (directory / "optimizer.bin").write_bytes(b"never read by the export")
    return directory, branches


def _torchvision_encoder(state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """The reference encoder: a torchvision ResNet-50 holding the checkpoint's tensors, without avgpool/fc."""
    model = torchvision.models.resnet50()
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    result = model.load_state_dict(encoder, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    return nn.Sequential(*list(model.children())[:-2]).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_reference_checkpoint_features_equal_the_reference_encoder(reference, reference_export):
    _, state = reference
    model = timm.create_model(f"local-dir:{reference_export}", pretrained=True).eval()
    encoder = _torchvision_encoder(state, "module.encoder.")
    with torch.no_grad():
        expected = encoder(_inputs())  # (2, 2048, 2, 2)
        actual = model.forward_features(_inputs())
        pooled = model(_inputs())
    assert actual.shape == expected.shape == (2, 2048, 2, 2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, expected.mean(dim=(2, 3)), rtol=0, atol=1e-4)


def test_timm_folder_contents(reference, reference_export):
    path, state = reference
    files = sorted(p.name for p in reference_export.iterdir())
    assert files == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]

    weights = reference_export / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    torchvision_keys = set(torchvision.models.resnet50().state_dict()) - {"fc.weight", "fc.bias"}
    assert set(tensors) == torchvision_keys  # backbone only, timm (= torchvision) names, no classifier
    assert all(torch.equal(v, state[f"module.encoder.{k}"]) for k, v in tensors.items())
    with safetensors.safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    assert metadata["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metadata["branch"] == "student"
    assert metadata["producer_version"] == clove_timm.__version__
    assert metadata["source_epoch"] == "400"

    config = json.loads((reference_export / "config.json").read_text())
    assert config["architecture"] == "resnet50"
    assert config["num_classes"] == 0
    assert config["num_features"] == 2048
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["pretrained_cfg"]["std"] == [0.229, 0.224, 0.225]
    assert config["pretrained_cfg"]["classifier"] == "fc"

    sums = dict(reversed(line.split("  ")) for line in (reference_export / "SHA256SUMS").read_text().splitlines())
    assert sums.keys() == {"README.md", "config.json", "model.safetensors"}
    for name, digest in sums.items():
        assert hashlib.sha256((reference_export / name).read_bytes()).hexdigest() == digest

    card = ModelCard.load(reference_export / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "mit"
    assert card.data.datasets == ["imagenet-1k"]
    weights_digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    for expected_text in (
        weights_digest,
        "400 epochs",
        "41.2",
        "features_only=True",
        "@inproceedings",
        "STRIDE_IN_1X1",
    ):
        assert expected_text in card.text


def test_teacher_branch_is_the_ema_encoder(reference):
    path, _ = reference
    source = load_source_checkpoint(path)
    teacher = prepare_backbone(path, arch="resnet50", branch="teacher", source=source)
    student = prepare_backbone(path, arch="resnet50", branch="student", source=source)
    assert teacher.branch == "teacher"
    assert torch.all(teacher.state_dict["layer3.1.conv2.weight"] == TEACHER_VALUE)
    assert not torch.all(student.state_dict["layer3.1.conv2.weight"] == TEACHER_VALUE)


def test_project_checkpoint_directory_exports_either_branch(project_checkpoint, tmp_path):
    directory, branches = project_checkpoint
    for branch in ("student", "teacher"):
        out = export_timm_folder(directory, tmp_path / branch, name="resnet18.clove_demo", branch=branch, epochs=3)
        state = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()
        assert state.keys() == branches[branch].keys()
        assert all(torch.equal(state[k], v) for k, v in branches[branch].items())
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == "resnet18"
        assert "3 epochs" in ModelCard.load(out / "README.md").text


def test_exported_folder_reexports_and_refuses_a_different_branch(project_checkpoint, tmp_path):
    directory, branches = project_checkpoint
    first = export_timm_folder(directory, tmp_path / "first", name="resnet18.clove_demo", branch="teacher")
    again = prepare_backbone(first / "model.safetensors", arch="resnet18")
    assert again.branch == "teacher"
    assert all(torch.equal(again.state_dict[k], v) for k, v in branches["teacher"].items())
    with pytest.raises(CheckpointFormatError, match=r"single backbone.*recorded branch: teacher"):
        prepare_backbone(first / "model.safetensors", arch="resnet18", branch="student")


def test_torchvision_export_loads_with_only_fc_missing_and_matches_timm(project_checkpoint, tmp_path):
    directory, branches = project_checkpoint
    out = export_torchvision(directory, tmp_path / "tv", name="resnet18.clove_demo")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["SHA256SUMS", "resnet18.clove_demo.torchvision.pth"]
    state = torch.load(out / files[1], map_location="cpu", weights_only=True)
    model = torchvision.models.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    model.fc = nn.Identity()
    backbone = timm.create_model("resnet18", num_classes=0)
    backbone.load_state_dict(branches["student"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_inputs()), backbone.eval()(_inputs()), rtol=0, atol=1e-5)


def test_mmdetection_export_keys_and_shapes(project_checkpoint, tmp_path):
    directory, _ = project_checkpoint
    out = export_mmdetection(directory, tmp_path / "mmdet", name="resnet18.clove_demo")
    checkpoint = torch.load(out / "resnet18.clove_demo.mmdet.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict", "meta"}
    # mmdetection's ResNet names parameters like torchvision's.
    expected = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == expected
    assert checkpoint["meta"]["branch"] == "student"
    directory_sha = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint["meta"]["source_sha256"] == directory_sha


def test_detectron2_export_renames_keys(reference, tmp_path):
    path, state = reference
    out = export_detectron2(path, tmp_path / "d2")
    with open(out / "resnet50.clove_in1k.detectron2.pkl", "rb") as f:
        payload = pickle.load(f)  # written by the test above, from tensors only
    assert payload["matching_heuristics"] is True
    assert "__author__" in payload
    weights = payload["model"]
    # Hand-written Detectron2 names (detectron2/modeling/backbone/resnet.py) and their torchvision sources.
    pairs = {
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.weight": "bn1.weight",
        "stem.conv1.norm.running_var": "bn1.running_var",
        "res2.0.conv1.weight": "layer1.0.conv1.weight",
        "res2.0.conv1.norm.bias": "layer1.0.bn1.bias",
        "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
        "res2.0.shortcut.norm.running_mean": "layer1.0.downsample.1.running_mean",
        "res3.3.conv3.weight": "layer2.3.conv3.weight",
        "res4.5.conv2.norm.weight": "layer3.5.bn2.weight",
        "res5.2.conv3.norm.running_var": "layer4.2.bn3.running_var",
    }
    for d2_key, tv_key in pairs.items():
        assert isinstance(weights[d2_key], np.ndarray)
        np.testing.assert_array_equal(weights[d2_key], state[f"module.encoder.{tv_key}"].numpy())
    # 318 backbone tensors minus 53 BatchNorm num_batches_tracked counters.
    assert len(weights) == 265
    blocks = {
        stage: {k.split(".")[1] for k in weights if k.startswith(stage + ".")}
        for stage in ("res2", "res3", "res4", "res5")
    }
    assert {stage: len(ids) for stage, ids in blocks.items()} == {"res2": 3, "res3": 4, "res4": 6, "res5": 3}
    assert not any(part in k for k in weights for part in ("layer", "bn", "downsample", "num_batches_tracked"))


class _RunsCode:
    """Unpickles by calling ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class UnknownOption:
    """A class the reference never stores; unpickling it would import this test module."""

    def __init__(self, marker):
        self.marker = marker


def _malicious_payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """Objects that create ``marker`` when unpickled unsafely, and the global the refusal must name."""
    touch = f"open({str(marker)!r}, 'w').close()"
    chain = functools.partial(functools.partial(exec, touch))
    return {
        "os_system": (_RunsCode(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "exec": (_RunsCode(exec, touch), "builtins.exec"),
        "partial_chain": (_RunsCode(chain), "functools.partial"),
        "unknown_class_in_opt": (UnknownOption(str(marker)), f"{__name__}.UnknownOption"),
    }


@pytest.mark.parametrize("payload", ["os_system", "exec", "partial_chain", "unknown_class_in_opt"])
@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_malicious_reference_checkpoint_is_refused(payload, legacy_format, tmp_path):
    marker = tmp_path / "executed"
    evil, offending = _malicious_payloads(marker)[payload]
    state = {"module.encoder.conv1.weight": torch.zeros(64, 3, 7, 7)}
    checkpoint = _reference_checkpoint(state)
    if payload == "unknown_class_in_opt":
        checkpoint["opt"].callback = evil
    else:
        checkpoint["optimizer"] = {"state": {}, "hook": evil}
    source = tmp_path / "downloads" / "ckpt_epoch_400.pth"
    source.parent.mkdir()
    torch.save(checkpoint, source, _use_new_zipfile_serialization=not legacy_format)

    out_dir = tmp_path / "exports" / "resnet50.clove_in1k"
    listing = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeCheckpointError, match=offending.replace(".", r"\.")):
        export_timm_folder(source, out_dir)
    assert not marker.exists()
    assert sorted(tmp_path.rglob("*")) == listing  # nothing written, not even the parent folder

    assert export_cli.main([str(source), str(out_dir)]) == 2
    assert not marker.exists() and not out_dir.exists()


def test_malicious_payload_is_live(tmp_path):
    """The payloads above really run code when unpickled without restriction (this is why they are refused)."""
    marker = tmp_path / "executed"
    for evil, _ in _malicious_payloads(marker).values():
        if isinstance(evil, _RunsCode):
            pickle.loads(pickle.dumps(evil))  # the test's own payload: touches a file in tmp_path
            assert marker.exists()
            marker.unlink()


def test_wrong_architecture_is_named(reference, tmp_path):
    path, _ = reference
    with pytest.raises(CheckpointFormatError, match=r"does not match timm 'resnet18'.*unexpected.*layer1\.0\.conv3"):
        export_timm_folder(path, tmp_path / "out", name="resnet18.clove_in1k")
    assert not (tmp_path / "out").exists()


def test_failed_verification_leaves_nothing(project_checkpoint, tmp_path, monkeypatch):
    directory, _ = project_checkpoint

    def corrupt(folder, prepared):
        raise ExportVerificationError(f"{folder}: simulated mismatch")

    monkeypatch.setattr("clove_timm.export._verify_timm_folder", corrupt)
    with pytest.raises(ExportVerificationError, match="simulated mismatch"):
        export_timm_folder(directory, tmp_path / "new" / "folder", name="resnet18.clove_demo")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_output_folder(project_checkpoint, tmp_path):
    directory, _ = project_checkpoint
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export_timm_folder(directory, tmp_path, name="resnet18.clove_demo")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_checkpoint_directory_without_safetensors(tmp_path):
    (tmp_path / "optimizer.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"without model\.safetensors"):
        load_source_checkpoint(tmp_path)


def test_pretraining_checkpoint_folders_are_exported_only_when_sealed(tmp_path):
    from training import checkpoint as ckpt

    # A folder as the pretraining loop leaves it: written under a temporary name, then sealed with COMPLETE.
    tmp = ckpt.temporary_dir(tmp_path, 7)
    write_clove_checkpoint_dir(tmp, arch="resnet10t", seed=0)
    ckpt.write_json_atomic(tmp / ckpt.TRAINER_STATE, {"step": 7})
    unsealed = tmp_path / "unsealed"
    shutil.copytree(tmp, unsealed)
    sealed = ckpt.finalize(tmp, tmp_path, 7, keep=1)
    assert load_source_checkpoint(sealed).layout == "clove_timm"
    with pytest.raises(CheckpointFormatError, match="without its COMPLETE manifest"):
        load_source_checkpoint(unsealed)
    model = sealed / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor's bytes: still a readable file
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="does not match the size and sha256"):
        load_source_checkpoint(sealed)
