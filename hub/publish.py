"""Publish an exported timm folder: ``python -m hub.publish OUT_DIR --repo-id ORG/NAME [options]``.

Refuses folders with pickles (.bin/.pth/.pt/.pkl and pickles under other names) and folders whose SHA256SUMS do not
match, then uploads with huggingface_hub (token from ``$HF_TOKEN`` or ``hf auth login``; endpoint from
``$HF_ENDPOINT``) and prints the commit hash and the pinned load line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from clove_timm.publish import UnpublishableFolderError, publish_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder written by python -m hub.export")
    parser.add_argument("--repo-id", required=True, help="Hub model repository ORG/NAME (created if missing)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--tag", default=None, help="tag to create on the new commit")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list the files; upload nothing")
    parser.add_argument("--message", default=None, help="commit message")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the publication; returns the process exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = publish_folder(
            args.folder,
            repo_id=args.repo_id,
            revision=args.revision,
            tag=args.tag,
            private=args.private,
            dry_run=args.dry_run,
            commit_message=args.message,
        )
    except (UnpublishableFolderError, ValueError, HfHubHTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.commit is None:
        print(f"dry run: would upload {', '.join(result.files)} to {result.repo_id}")
    else:
        print(f"commit: {result.commit}")
        if result.tag:
            print(f"tag: {result.tag}")
    print(result.load_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
