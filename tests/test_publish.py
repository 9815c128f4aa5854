"""Publishing: folder checks, and an upload with the real huggingface_hub client to a loopback Hub server started
here, then a download through the registered timm tag.

``_LoopbackHub`` implements the part of the Hub's HTTP API that huggingface_hub's ``create_repo``,
``create_branch``, ``upload_folder`` (preupload + NDJSON commit), ``create_tag`` and ``hf_hub_download``
(HEAD/GET ``resolve``) use. It answers every preupload with ``uploadMode: regular``, so files travel base64-encoded
inside the commit request; Git LFS and Xet transfers are not emulated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import safetensors.torch

from clove_timm.export import export_timm_folder
from clove_timm.publish import UnpublishableFolderError, check_publishable, publish_folder
from clove_timm.registry import HF_ORG_ENV
from hub import publish as publish_cli
from tests.hub_fixtures import autoload_site_dir, run_python, write_clove_checkpoint_dir

TOKEN = "hf_loopback_token"
ORG = "loopback-org"
REPO_ID = f"{ORG}/resnet50.clove_in1k"
SMALL_REPO_ID = f"{ORG}/resnet10t.clove_demo"


class _Repo:
    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}  # commit hash -> files
        self.branches: dict[str, str | None] = {"main": None}  # branch -> head commit
        self.tags: dict[str, str] = {}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.commits else None


class _LoopbackHub:
    """A threaded HTTP server on 127.0.0.1 holding model repositories in memory."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- HTTP plumbing

    @staticmethod
    def _body(handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(handler.rfile.readline().strip(), 16):
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
            handler.rfile.readline()
            return b"".join(chunks)
        return handler.rfile.read(int(handler.headers.get("Content-Length", 0)))

    @staticmethod
    def _reply(handler, status: int, payload=None, *, body: bytes | None = None, headers=None, head=False) -> None:
        data = body if body is not None else json.dumps(payload if payload is not None else {}).encode()
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        if body is None:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    def _dispatch(self, handler, method: str) -> None:
        path = urlsplit(handler.path).path
        self.requests.append((method, path, handler.headers.get("Authorization")))
        body = self._body(handler) if method == "POST" else b""
        if method == "POST" and handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(handler, 401, {"error": "Invalid credentials"})
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda h, b: self._reply(h, 200, {"errors": [], "warnings": []})),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", self._preupload),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", self._commit),
            ("POST", r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", self._branch),
            ("POST", r"/api/models/([^/]+/[^/]+)/tag/([^/]+)", self._tag),
            ("GET", r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", self._repo_info),
            ("GET", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self._resolve),
            ("HEAD", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self._resolve),
        ]
        for route_method, pattern, action in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                return action(handler, body, *map(unquote, match.groups()))
        return self._reply(handler, 404, {"error": f"no route for {method} {path}"})

    def _repo_or_404(self, handler, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            headers = {"X-Error-Code": "RepoNotFound"}
            self._reply(handler, 404, {"error": "Repository not found"}, headers=headers, head=head)
        return repo

    # --- API endpoints

    def _create_repo(self, handler, body: bytes) -> None:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if repo_id in self.repos:
            return self._reply(handler, 409, {"error": "You already created this model repo", "url": repo_id})
        self.repos[repo_id] = _Repo()
        return self._reply(handler, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _preupload(self, handler, body: bytes, repo_id: str, revision: str) -> None:
        if self._repo_or_404(handler, repo_id):
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            self._reply(handler, 200, {"files": answer, "commitOid": None})

    def _commit(self, handler, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_or_404(handler, repo_id)
        if repo is None:
            return None
        if revision not in repo.branches:
            return self._reply(
                handler, 404, {"error": f"branch {revision} not found"}, headers={"X-Error-Code": "RevisionNotFound"}
            )
        parent = repo.branches[revision]
        files = dict(repo.commits.get(parent, {})) if parent else {}
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return self._reply(handler, 400, {"error": f"unsupported commit operation {item['key']}"})
        digest = hashlib.sha1(
            repr((parent, summary, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))).encode()
        )
        commit = digest.hexdigest()
        repo.commits[commit] = files
        repo.branches[revision] = commit
        return self._reply(
            handler, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{commit}", "commitOid": commit, "success": True}
        )

    def _branch(self, handler, body: bytes, repo_id: str, branch: str) -> None:
        repo = self._repo_or_404(handler, repo_id)
        if repo is None:
            return None
        if branch in repo.branches:
            return self._reply(handler, 409, {"error": "Reference already exists"})
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start)
        return self._reply(handler, 200, {})

    def _tag(self, handler, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_or_404(handler, repo_id)
        if repo is None:
            return None
        tag = json.loads(body)["tag"]
        if tag in repo.tags:
            return self._reply(handler, 409, {"error": "Tag already exists"})
        repo.tags[tag] = repo.resolve(revision)
        return self._reply(handler, 200, {})

    def _repo_info(self, handler, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_or_404(handler, repo_id)
        if repo is not None:
            commit = repo.resolve(revision)
            siblings = [{"rfilename": name} for name in sorted(repo.commits.get(commit, {}))]
            self._reply(handler, 200, {"id": repo_id, "sha": commit, "siblings": siblings, "private": False})

    def _resolve(self, handler, body: bytes, repo_id: str, revision: str, filename: str) -> None:
        head = handler.command == "HEAD"
        repo = self._repo_or_404(handler, repo_id, head=head)
        if repo is None:
            return None
        commit = repo.resolve(revision)
        if commit is None:
            return self._reply(handler, 404, {}, headers={"X-Error-Code": "RevisionNotFound"}, head=head)
        content = repo.commits[commit].get(filename)
        if content is None:
            return self._reply(handler, 404, {}, headers={"X-Error-Code": "EntryNotFound"}, head=head)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        return self._reply(handler, 200, body=content, headers=headers, head=head)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    write_clove_checkpoint_dir(root / "ckpt", arch="resnet50", seed=11)
    return export_timm_folder(root / "ckpt", root / "resnet50.clove_in1k", org=ORG)


@pytest.fixture(scope="module")
def small_exported(tmp_path_factory):
    """A resnet10t export: a valid folder for the tests that do not load it through the resnet50 tag."""
    root = tmp_path_factory.mktemp("publish_small")
    write_clove_checkpoint_dir(root / "ckpt", arch="resnet10t", seed=12)
    return export_timm_folder(root / "ckpt", root / "resnet10t.clove_demo", name="resnet10t.clove_demo", org=ORG)


@pytest.fixture
def hub():
    with _LoopbackHub() as server:
        yield server


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@pytest.mark.integration
def test_publish_then_load_through_registered_tag(exported, hub, tmp_path):
    result = publish_folder(exported, repo_id=REPO_ID, tag="v1.0", endpoint=hub.url, token=TOKEN)

    repo = hub.repos[REPO_ID]
    assert re.fullmatch(r"[0-9a-f]{40}", result.commit)
    assert repo.branches["main"] == result.commit
    assert repo.tags["v1.0"] == result.commit
    uploaded = repo.commits[result.commit]
    assert sorted(uploaded) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    assert all(uploaded[name] == (exported / name).read_bytes() for name in uploaded)
    assert result.load_line == f"timm.create_model('hf-hub:{REPO_ID}@{result.commit}', pretrained=True)"
    assert {auth for method, _, auth in hub.requests if method == "POST"} == {f"Bearer {TOKEN}"}

    code = """
import json, os, sys
import safetensors.torch, torch
import clove_timm, timm  # clove_timm first: its own `import timm` passes through the installed hook
expected = safetensors.torch.load_file(os.environ["EXPORTED"])
def same(model):
    state = model.state_dict()
    return sorted(state) == sorted(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
by_tag = timm.create_model("resnet50.clove_in1k", pretrained=True)
pinned = timm.create_model("hf-hub:" + os.environ["PINNED"], pretrained=True)
tag_pinned = timm.create_model(
    "resnet50.clove_in1k", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": os.environ["PINNED"]})
tag_entries = sorted(n for n in timm.models.get_arch_pretrained_cfgs("resnet50") if ".clove" in n)
print(json.dumps({"by_tag": same(by_tag), "pinned": same(pinned) and same(tag_pinned),
                  "hub_id": by_tag.pretrained_cfg["hf_hub_id"],
                  "tag_entries": tag_entries}))
"""
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        HF_ORG_ENV: ORG,
        "EXPORTED": str(exported / "model.safetensors"),
        "PINNED": f"{REPO_ID}@{result.commit}",
    }
    result_in_fresh_interpreter = run_python(code, env=env, site_dir=autoload_site_dir(tmp_path))
    assert result_in_fresh_interpreter == {
        "by_tag": True,
        "pinned": True,
        "hub_id": REPO_ID,
        "tag_entries": ["resnet50.clove_ep200_in1k", "resnet50.clove_ep50_in1k", "resnet50.clove_in1k"],
    }
    downloads = {path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert f"/{REPO_ID}/resolve/main/model.safetensors" in downloads
    # The pinned load resolves config.json at the commit; its weights are that commit's blob, already cached.
    assert f"/{REPO_ID}/resolve/{result.commit}/config.json" in downloads


@pytest.mark.integration
def test_cli_publishes_to_a_new_branch_and_prints_the_pinned_load_line(small_exported, hub, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish_cli.main([str(small_exported), "--repo-id", SMALL_REPO_ID]) == 0
    main_commit = hub.repos[SMALL_REPO_ID].branches["main"]
    capsys.readouterr()

    assert (
        publish_cli.main([str(small_exported), "--repo-id", SMALL_REPO_ID, "--revision", "ep400", "--tag", "r1"]) == 0
    )
    out = capsys.readouterr().out
    repo = hub.repos[SMALL_REPO_ID]
    commit = repo.branches["ep400"]
    assert commit != main_commit and repo.branches["main"] == main_commit
    assert f"commit: {commit}" in out
    assert f"timm.create_model('hf-hub:{SMALL_REPO_ID}@{commit}', pretrained=True)" in out
    assert repo.tags["r1"] == commit


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra.pth", "weights.pt", "model_final.pkl"])
def test_refuses_pickle_files(small_exported, hub, tmp_path, name):
    folder = _copy(small_exported, tmp_path)
    (folder / name).write_bytes(b"\x80\x04N.")  # pickle of None
    with pytest.raises(UnpublishableFolderError, match=rf"{re.escape(name)}: pickle file type"):
        publish_folder(folder, repo_id=SMALL_REPO_ID, endpoint=hub.url, token=TOKEN)
    assert hub.requests == []


def test_refuses_a_pickle_under_another_name(small_exported, tmp_path):
    folder = _copy(small_exported, tmp_path)
    (folder / "notes.txt").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")
    with pytest.raises(UnpublishableFolderError, match=r"notes\.txt: starts with a pickle protocol header"):
        check_publishable(folder)


def test_refuses_checksum_mismatch_and_unlisted_files(small_exported, tmp_path):
    folder = _copy(small_exported, tmp_path)
    with open(folder / "README.md", "a") as f:
        f.write("\nedited after export\n")
    (folder / "extra.json").write_text("{}")
    with pytest.raises(UnpublishableFolderError) as error:
        check_publishable(folder)
    assert "README.md: sha256 differs" in str(error.value)
    assert "extra.json: not listed in SHA256SUMS" in str(error.value)


def test_refuses_missing_files(small_exported, tmp_path):
    folder = _copy(small_exported, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(UnpublishableFolderError, match=r"config\.json: missing"):
        check_publishable(folder)


def test_dry_run_checks_without_network(small_exported, hub):
    result = publish_folder(small_exported, repo_id=SMALL_REPO_ID, dry_run=True, endpoint=hub.url, token=TOKEN)
    assert result.commit is None
    assert result.files == ("README.md", "SHA256SUMS", "config.json", "model.safetensors")
    assert result.load_line == f"timm.create_model('hf-hub:{SMALL_REPO_ID}', pretrained=True)"
    assert hub.requests == []
    assert safetensors.torch.load_file(small_exported / "model.safetensors")  # folder untouched and readable
