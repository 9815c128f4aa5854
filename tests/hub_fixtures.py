"""Helpers shared by the registry, export and publish tests: synthetic checkpoints, an offline Hugging Face cache,
and fresh interpreters with or without the timm post-import hook."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch

import _clove_timm_autoload

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_backbone(arch: str, *, seed: int) -> dict[str, torch.Tensor]:
    """A timm backbone state dict (``num_classes=0``) with random weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith("bn3.weight") or key.endswith("bn2.weight"):
            value.copy_(1.0 + 0.1 * torch.randn(value.shape, generator=generator))  # timm zero-inits some
    return {k: v.clone() for k, v in state.items()}


def write_clove_checkpoint_dir(directory: Path, *, arch: str, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Write ``directory/model.safetensors`` with CLoVEModel keys, as the pretraining loop's ``save_state`` does.

    Returns:
        ``{"student": backbone, "teacher": backbone}`` with the tensors written.
    """
    student = random_backbone(arch, seed=seed)
    # A distinct teacher without building a second model (halved weights keep activations finite).
    teacher = {k: 0.5 * v if v.is_floating_point() else v.clone() for k, v in student.items()}
    state = {f"student.backbone.{k}": v for k, v in student.items()}
    state |= {f"teacher.backbone.{k}": v for k, v in teacher.items()}
    # Heads: present in the checkpoint, ignored by the export.
    state |= {"student.projector.0.weight": torch.randn(16, 8, 1, 1), "predictor.out_proj.weight": torch.randn(8, 8)}
    state |= {"teacher.projector.0.weight": torch.randn(16, 8, 1, 1)}
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, directory / "model.safetensors")
    return {"student": student, "teacher": teacher}


def build_offline_hf_cache(cache_dir: Path, repo_id: str, folder: Path, *, commit: str | None = None) -> str:
    """Lay out ``folder``'s files as huggingface_hub's cache does after a download of ``repo_id`` at ``main``.

    ``<cache>/models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to the blobs, and
    ``refs/main`` holding the commit hash (the documented cache layout).

    Returns:
        The commit hash written to ``refs/main``.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo_dir / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def autoload_site_dir(tmp_path: Path) -> Path:
    """A site directory holding the ``.pth`` file a wheel install puts into site-packages."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / _clove_timm_autoload.PTH_FILENAME).write_text(_clove_timm_autoload.PTH_LINE)
    return site_dir


def start_python(code: str, *, env: dict[str, str] | None = None, site_dir: Path | None = None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter (collect it with :func:`finish_python`); several can run at once.

    With ``site_dir``, the interpreter first processes that directory's ``.pth`` files (``site.addsitedir``, what
    start-up does for site-packages), before anything else is imported. ``HF_*`` and ``CLOVE_TIMM_*`` variables of
    this process are not inherited.
    """
    prelude = f"import site; site.addsitedir({str(site_dir)!r})\n" if site_dir else ""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CLOVE_TIMM_"))}
    # One intra-op thread each: several interpreters run at once on few cores.
    full_env |= {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code],
        env=full_env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_python(process: subprocess.Popen, *, timeout: int = 180) -> dict:
    """Wait for a :func:`start_python` interpreter and return the JSON object it printed last."""
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"subprocess failed ({process.returncode}):\n{stdout}\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_python(code: str, *, env: dict[str, str] | None = None, site_dir: Path | None = None) -> dict:
    """:func:`start_python` and :func:`finish_python` in one call."""
    return finish_python(start_python(code, env=env, site_dir=site_dir))
