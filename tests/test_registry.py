"""CLoVE pretrained tags on timm's resnet50: configs, listing, idempotence, the private-registry contract, the
timm post-import hook, and offline loading by tag from a Hugging Face cache built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import _clove_timm_autoload
from clove_timm import registry
from clove_timm.export import export_timm_folder
from clove_timm.registry import HF_ORG_ENV, TimmRegistryError, check_timm_registry, register_pretrained_tags
from tests.hub_fixtures import (
    REPO_ROOT,
    autoload_site_dir,
    build_offline_hf_cache,
    finish_python,
    run_python,
    start_python,
    write_clove_checkpoint_dir,
)

CLOVE_NAMES = ["resnet50.clove_ep50_in1k", "resnet50.clove_ep200_in1k", "resnet50.clove_in1k"]
TEST_ORG = "loopback-org"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A resnet50 backbone exported as the Hub folder of ``resnet50.clove_in1k``, and its tensors."""
    root = tmp_path_factory.mktemp("registry")
    write_clove_checkpoint_dir(root / "ckpt", arch="resnet50", seed=3)
    folder = export_timm_folder(root / "ckpt", root / "resnet50.clove_in1k", org=TEST_ORG)
    return folder, safetensors.torch.load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def offline_env(exported, tmp_path_factory):
    """Environment of an interpreter whose Hugging Face cache holds the export under ``TEST_ORG``, offline."""
    folder, _ = exported
    root = tmp_path_factory.mktemp("hf")
    build_offline_hf_cache(root / "hub", f"{TEST_ORG}/resnet50.clove_in1k", folder)
    return {
        "HF_HOME": str(root / "home"),
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        HF_ORG_ENV: TEST_ORG,
        "EXPORTED": str(folder / "model.safetensors"),
    }


# Loads by tag from the offline cache and compares with the exported file; prints what the test asserts on.
_LOAD_BY_TAG = """
import json, os, sys
import safetensors.torch, timm, torch
expected = safetensors.torch.load_file(os.environ["EXPORTED"])
model = timm.create_model("resnet50.clove_in1k", pretrained=True)
state = model.state_dict()
print(json.dumps({
    "tags": timm.list_pretrained("resnet50.clove*"),
    "equal": sorted(state) == sorted(expected) and all(torch.equal(state[k], v) for k, v in expected.items()),
    "num_classes": model.num_classes,
    "clove_imported": "clove_timm" in sys.modules,
    "hook_left": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "TimmPostImportFinder"],
    "timm_loader": type(timm.__spec__.loader).__name__,
}))
"""

# timm alone (no hook, no clove_timm): the Hub folder through hf-hub: and local-dir:, timm's own resnet50 tags;
# then `import clove_timm` and the tag from the offline cache.
_TIMM_THEN_CLOVE = """
import json, os, sys
import safetensors.torch, timm, torch
expected = safetensors.torch.load_file(os.environ["EXPORTED"])
def same(model):
    state = model.state_dict()
    return sorted(state) == sorted(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
folder = os.path.dirname(os.environ["EXPORTED"])
equal = {s.split(":")[0]: same(timm.create_model(s, pretrained=True))
         for s in ("hf-hub:" + os.environ["REPO_ID"], "local-dir:" + folder)}
cfg = timm.models.get_pretrained_cfg("resnet50")
result = {"tags": timm.list_pretrained("resnet50*"), "default": [cfg.tag, cfg.hf_hub_id, cfg.url], "equal": equal,
          "clove_imported": "clove_timm" in sys.modules}
import clove_timm
result["after_import"] = {"tags": timm.list_pretrained("resnet50.clove*"),
                          "equal": same(timm.create_model("resnet50.clove_in1k", pretrained=True))}
print(json.dumps(result))
"""


def test_tags_have_headless_imagenet_cfg():
    for name in CLOVE_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.architecture == "resnet50"
        assert cfg.tag == name.split(".")[1]
        assert cfg.num_classes == 0
        assert cfg.classifier == "fc"
        assert cfg.input_size == (3, 224, 224)
        assert cfg.mean == (0.485, 0.456, 0.406)
        assert cfg.std == (0.229, 0.224, 0.225)
        assert cfg.license == "mit"
        assert cfg.origin_url == "https://github.com/sthalles/CLoVE"
        assert cfg.paper_ids == "arXiv:2310.00527"
        assert cfg.hf_hub_id == f"{registry.hf_org()}/{name}"
        assert cfg.hf_hub_filename == "model.safetensors"
    epochs = {n: timm.models.get_pretrained_cfg(n).description for n in CLOVE_NAMES}
    assert "400-epoch" in epochs["resnet50.clove_in1k"]
    assert "200-epoch" in epochs["resnet50.clove_ep200_in1k"]
    assert "50-epoch" in epochs["resnet50.clove_ep50_in1k"]


def test_list_pretrained_shows_exactly_the_clove_tags():
    assert timm.list_pretrained("resnet50.clove*") == CLOVE_NAMES
    assert all(timm.models.is_model_pretrained(n) for n in CLOVE_NAMES)


def test_registration_is_idempotent():
    before = timm.models.get_arch_pretrained_cfgs("resnet50")
    assert set(register_pretrained_tags()) == set(CLOVE_NAMES)
    assert set(register_pretrained_tags()) == set(CLOVE_NAMES)
    after = timm.models.get_arch_pretrained_cfgs("resnet50")
    assert list(after) == list(before)
    assert timm.list_pretrained("resnet50.clove*") == CLOVE_NAMES


def test_org_environment_variable_overrides_hub_id(monkeypatch):
    monkeypatch.setenv(HF_ORG_ENV, "mirror-org")
    try:
        register_pretrained_tags()
        assert timm.models.get_pretrained_cfg("resnet50.clove_in1k").hf_hub_id == "mirror-org/resnet50.clove_in1k"
    finally:
        monkeypatch.delenv(HF_ORG_ENV)
        register_pretrained_tags()
    assert timm.models.get_pretrained_cfg("resnet50.clove_in1k").hf_hub_id == (
        f"{registry.DEFAULT_HF_ORG}/resnet50.clove_in1k"
    )


def test_private_registry_contract():
    """Pins what clove_timm/registry.py writes to: fails with the check's message when a timm upgrade changes it."""
    check_timm_registry("resnet50")
    from timm.models import _registry as timm_registry

    # The tables must be the ones timm's public API reads: a tag written there is visible through it.
    assert "resnet50.clove_in1k" in timm_registry._model_pretrained_cfgs
    assert "resnet50.clove_in1k" in timm_registry._model_has_pretrained
    assert "resnet50.clove_in1k" in timm_registry._model_with_tags["resnet50"]
    assert "clove_in1k" in timm_registry._model_default_cfgs["resnet50"].cfgs


def test_contract_check_names_a_broken_table(monkeypatch):
    from timm.models import _registry as timm_registry

    monkeypatch.setattr(timm_registry, "_model_with_tags", [])
    with pytest.raises(TimmRegistryError, match=r"timm .* changed its private model registry.*_model_with_tags"):
        check_timm_registry("resnet50")


def test_create_with_features_only_and_new_classifier(exported):
    folder, tensors = exported
    overlay = {"file": str(folder / "model.safetensors")}
    features = timm.create_model(
        "resnet50.clove_in1k",
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        features_only=True,
        out_indices=(1, 2, 3, 4),
    )
    assert features.feature_info.channels() == [256, 512, 1024, 2048]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    assert torch.equal(features.state_dict()["layer4.2.conv3.weight"], tensors["layer4.2.conv3.weight"])

    classifier = timm.create_model(
        "resnet50.clove_in1k", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10
    )
    assert classifier.fc.out_features == 10
    assert torch.equal(classifier.conv1.weight, tensors["conv1.weight"])


@pytest.fixture(scope="module")
def interpreters(offline_env, tmp_path_factory):
    """Fresh interpreters, started together: the hook installed (as by a wheel install) or disabled.

    The hook with `import clove_timm` before timm (clove_timm importing timm re-enters the hook) runs in
    tests/test_publish.py, loading from the loopback Hub.
    """
    site_dir = autoload_site_dir(tmp_path_factory.mktemp("site"))
    disabled = {**offline_env, _clove_timm_autoload.DISABLE_ENV: "1", "REPO_ID": f"{TEST_ORG}/resnet50.clove_in1k"}
    processes = {
        "timm_alone": start_python(_LOAD_BY_TAG, env=offline_env, site_dir=site_dir),
        "hook_disabled": start_python(_TIMM_THEN_CLOVE, env=disabled, site_dir=site_dir),
    }
    return {name: finish_python(process) for name, process in processes.items()}


def test_import_timm_alone_loads_tag_from_offline_cache_through_the_hook(interpreters):
    result = interpreters["timm_alone"]
    assert result["clove_imported"] is True
    assert result["tags"] == CLOVE_NAMES
    assert result["equal"] is True
    assert result["num_classes"] == 0
    assert result["hook_left"] == []  # one-shot: the finder removed itself
    assert result["timm_loader"] == "SourceFileLoader"  # timm keeps its real loader


def test_import_clove_timm_loads_tag_from_offline_cache(interpreters):
    """Without the hook, `import clove_timm` registers the tags; the tag loads from the offline cache."""
    result = interpreters["hook_disabled"]["after_import"]
    assert result == {"tags": CLOVE_NAMES, "equal": True}


def test_hook_disabled_by_environment(interpreters):
    result = interpreters["hook_disabled"]
    assert result["clove_imported"] is False
    assert not any(".clove" in tag for tag in result["tags"])


def test_hub_folder_loads_with_timm_alone(interpreters):
    """config.json is timm's hub format: hf-hub: (offline cache) and local-dir: load without clove_timm."""
    assert interpreters["hook_disabled"]["equal"] == {"hf-hub": True, "local-dir": True}


def test_plain_resnet50_keeps_timms_default(interpreters):
    """timm's resnet50 tags and default are the same with clove_timm as without it, plus the CLoVE tags."""
    baseline = interpreters["hook_disabled"]
    assert set(timm.list_pretrained("resnet50*")) - set(baseline["tags"]) == set(CLOVE_NAMES)
    assert set(baseline["tags"]) <= set(timm.list_pretrained("resnet50*"))
    cfg = timm.models.get_pretrained_cfg("resnet50")
    assert [cfg.tag, cfg.hf_hub_id, cfg.url] == baseline["default"]


def test_hook_costs_one_stdlib_module_when_timm_is_not_imported(tmp_path):
    code = """
import json, sys
before = set(sys.modules)
import site
site.addsitedir(SITE)
new = sorted(set(sys.modules) - before)
print(json.dumps({"new": new, "finders": [type(f).__name__ for f in sys.meta_path]}))
""".replace("SITE", repr(str(autoload_site_dir(tmp_path))))
    result = run_python(code)
    assert result["new"] == ["_clove_timm_autoload"]
    assert result["finders"][0] == "TimmPostImportFinder"


def test_finder_wraps_only_the_top_level_timm_loader():
    finder = _clove_timm_autoload.TimmPostImportFinder()
    assert finder.find_spec("json") is None
    assert finder.find_spec("timm.models") is None
    spec = finder.find_spec("timm")
    assert spec.origin == timm.__file__
    assert type(spec.loader).__name__ == "_PostImportLoader"
    assert spec.loader.get_filename("timm") == timm.__file__  # other loader attributes pass through


@pytest.mark.slow
def test_wheel_install_ships_the_hook(tmp_path):
    """Build the wheel, install it into a new virtualenv, and import only timm there."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "_clove_timm_autoload.py"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for package in ("clove_timm", "training", "hub"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("clove_timm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(_clove_timm_autoload.PTH_FILENAME).decode() == _clove_timm_autoload.PTH_LINE
        assert "_clove_timm_autoload.py" in archive.namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "-q", wheel], check=True)
    site_packages = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # torch, timm and the rest come from this environment, after the new site-packages on sys.path.
    (site_packages / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import json, sys, timm\n"
        "print(json.dumps([timm.list_pretrained('resnet50.clove*'), sys.modules['clove_timm'].__file__]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CLOVE_TIMM_")}
    out = subprocess.run([python, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    tags, clove_file = json.loads(out.stdout.strip().splitlines()[-1])
    assert tags == CLOVE_NAMES
    assert Path(clove_file).is_relative_to(site_packages)
