"""Publish an exported timm folder to the Hugging Face Hub.

:func:`check_publishable` refuses what should never reach the Hub from this project: pickled files (by suffix and
by content: a pickle or ``torch.save`` archive under another name), a ``model.safetensors`` that does not parse, and
a folder whose ``SHA256SUMS`` does not match its files. :func:`publish_folder` then uploads with
``huggingface_hub`` (creating the repository and branch if needed), optionally tags the commit, and returns the
commit hash with the pinned load line ``timm.create_model('hf-hub:ORG/NAME@<commit>', pretrained=True)``.

The token comes from huggingface_hub's usual sources: ``$HF_TOKEN`` or ``hf auth login``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi

from clove_timm.checkpoint_io import SAFETENSORS_NAME, SHA256SUMS_NAME, read_safetensors_metadata, verify_sha256sums

__all__ = [
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "PublishResult",
    "UnpublishableFolderError",
    "check_publishable",
    "publish_folder",
]

_logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".pth.tar")
"""File name endings that mean a pickle (PyTorch, Detectron2, Lightning)."""

REQUIRED_FILES = (SAFETENSORS_NAME, "config.json", "README.md", SHA256SUMS_NAME)


class UnpublishableFolderError(ValueError):
    """The folder must not be uploaded (pickles, missing files, checksum mismatch)."""


@dataclass(frozen=True)
class PublishResult:
    """Outcome of :func:`publish_folder`.

    Attributes:
        repo_id: Hub repository, ``org/name``.
        files: the files uploaded (or that would be, for a dry run), relative to the folder.
        commit: the commit hash; ``None`` for a dry run.
        revision: the branch committed to (``None``: the default branch).
        tag: the tag created on the commit, if any.
    """

    repo_id: str
    files: tuple[str, ...]
    commit: str | None
    revision: str | None = None
    tag: str | None = None

    @property
    def load_line(self) -> str:
        """The pinned timm load line; unpinned for a dry run."""
        pin = f"@{self.commit}" if self.commit else ""
        return f"timm.create_model('hf-hub:{self.repo_id}{pin}', pretrained=True)"


def _looks_pickled(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "starts with a pickle protocol header"
    if head == b"PK\x03\x04":
        return "is a zip archive (torch.save writes pickles into zip archives)"
    return None


def check_publishable(folder: str | Path) -> tuple[str, ...]:
    """Check that an export folder is safe and complete to upload.

    Args:
        folder: a folder written by :func:`clove_timm.export.export_timm_folder`.

    Returns:
        The folder's files, relative paths, sorted.

    Raises:
        UnpublishableFolderError: pickled files, missing required files, an unreadable ``model.safetensors`` or
            ``config.json``, or a ``SHA256SUMS`` mismatch (the message names every offending file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnpublishableFolderError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = tuple(p.relative_to(folder).as_posix() for p in files)
    problems = [f"{n}: pickle file type" for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    for path, name in zip(files, names, strict=True):
        if not name.endswith(".safetensors") and not name.lower().endswith(PICKLE_SUFFIXES):
            reason = _looks_pickled(path)
            if reason:
                problems.append(f"{name}: {reason}")
    problems += [f"{n}: missing" for n in REQUIRED_FILES if n not in names]
    if problems:
        raise UnpublishableFolderError(f"{folder}: refusing to publish: " + "; ".join(problems))
    try:
        read_safetensors_metadata(folder / SAFETENSORS_NAME)
    except Exception as error:  # safetensors' own error types
        raise UnpublishableFolderError(
            f"{folder / SAFETENSORS_NAME}: not a readable safetensors file: {error}"
        ) from error
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnpublishableFolderError(f"{folder / 'config.json'}: not readable JSON: {error}") from error
    if not isinstance(config, dict) or "architecture" not in config or "pretrained_cfg" not in config:
        raise UnpublishableFolderError(
            f"{folder / 'config.json'}: not timm's hub config (needs 'architecture' and 'pretrained_cfg')"
        )
    try:
        verify_sha256sums(folder)
    except ValueError as error:
        raise UnpublishableFolderError(str(error)) from error
    return names


def publish_folder(
    folder: str | Path,
    *,
    repo_id: str,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PublishResult:
    """Check an export folder and upload it to a Hub model repository.

    Args:
        folder: export folder (see :func:`check_publishable`).
        repo_id: ``org/name``; created (private if ``private``) when it does not exist.
        revision: branch to commit to, created from the default branch if missing; ``None``: the default branch.
        tag: tag to create on the new commit.
        private: create the repository as private (ignored if it exists).
        dry_run: check the folder and report what would be uploaded, without network access.
        commit_message: default ``"Upload <folder name> with clove_timm"``.
        endpoint: Hub endpoint; default ``$HF_ENDPOINT`` or huggingface.co.
        token: Hub token; default huggingface_hub's (``$HF_TOKEN`` or the stored login).

    Returns:
        The repository, files, commit hash and the pinned load line.

    Raises:
        UnpublishableFolderError: the folder fails :func:`check_publishable` (nothing uploaded).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    folder = Path(folder)
    files = check_publishable(folder)
    if dry_run:
        return PublishResult(repo_id=repo_id, files=files, commit=None, revision=revision, tag=tag)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with clove_timm",
    )
    if tag:
        api.create_tag(repo_id, tag=tag, revision=info.oid)
    _logger.info("published %s to %s at %s", folder, repo_id, info.oid)
    return PublishResult(repo_id=repo_id, files=files, commit=info.oid, revision=revision, tag=tag)
