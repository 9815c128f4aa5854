"""Bad data: a generated folder of broken and odd files through the source, two DataLoader workers, and the loop.

The folder (``tests/bad_images.py``) holds 18 usable images (10 plain JPEGs, CMYK, grayscale, transparent palette,
RGBA, 16-bit, 1x1, 1x500, 500x1), 7 bad files (3 truncated JPEGs, zero bytes, text as .jpg, 2 decompression bombs)
and 5 files that are not data (text, .dat, hidden files), plus an empty class folder. Which file is bad is known by
construction; the expected replacements are derived from that list here, not from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import ImageFile
from torch.utils.data import DataLoader

from clove_timm.views import MultiCropGeometry, MultiCropPhotometric
from tests.bad_images import BACKGROUND, HIDDEN_COLOUR, OPAQUE_COLOUR, make_bad_image_folder
from training import checkpoint as ckpt
from training.config import BatchPlan
from training.data import (
    QUARANTINE_FILE,
    BadDataError,
    BadImageError,
    ImageFolderSource,
    MultiCropDataset,
    Quarantine,
    StepSampler,
    sample_generator,
    worker_init,
)

GEOMETRY = dict(global_size=16, local_size=8, num_local=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_bad_image_folder(tmp_path_factory.mktemp("bad_folder"))


def _expected_skips(folder) -> list[int]:
    """For each index: how many files in a row, from it on (wrapping around), are bad."""
    names, bad = folder.images, set(folder.bad)
    skips = []
    for i in range(len(names)):
        k = 0
        while names[(i + k) % len(names)] in bad:
            k += 1
        skips.append(k)
    return skips


def _quarantined(path):
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [line.split("\t")[0] for line in lines], [line.split("\t")[1] for line in lines]


def test_the_folder_lists_images_only(folder):
    source = ImageFolderSource(folder.root)
    assert [source.relative_path(i) for i in range(len(source))] == folder.images
    assert len(folder.good) == 18 and len(folder.bad) == 7 and len(folder.not_data) == 5


def test_each_bad_file_is_refused_with_its_reason_and_each_odd_one_loads_as_rgb(folder):
    source = ImageFolderSource(folder.root)
    expected_reason = {
        "class_a/img_03t.jpg": "truncated",
        "class_a/img_06t.jpg": "truncated",
        "class_a/img_09t.jpg": "truncated",
        "class_b/bomb_100mp.png": "100000000 pixels exceed the limit of 89478485",
        "class_b/bomb_400mp.png": "DecompressionBombError",
        "class_z/text.jpg": "cannot identify image file",
        "class_z/zero_bytes.jpg": "cannot identify image file",
    }
    assert set(expected_reason) == set(folder.bad)
    sizes = {"class_b/one_pixel.png": (1, 1), "class_b/one_row.png": (500, 1), "class_b/one_column.png": (1, 500)}
    for index, name in enumerate(folder.images):
        if name in folder.bad:
            with pytest.raises(BadImageError) as error:
                source.load(index)
            assert expected_reason[name] in error.value.reason, name
            assert str(folder.root / name) in str(error.value)
        else:
            image = source.load(index)
            assert image.mode == "RGB", name
            assert image.size == sizes.get(name, image.size)


def test_bombs_are_refused_from_the_header_without_decoding(folder, monkeypatch):
    decoded = []
    original = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.filename)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    source = ImageFolderSource(folder.root)
    for name in ("class_b/bomb_100mp.png", "class_b/bomb_400mp.png"):
        with pytest.raises(BadImageError, match="pixels"):
            source.load(folder.images.index(name))
    assert decoded == []
    source.load(folder.images.index("class_b/rgba.png"))
    assert set(decoded) == {str(folder.root / "class_b/rgba.png")}  # the spy sees real decodes
    # the limit is a setting: a 1 000-pixel cap refuses an ordinary photo the same way
    small_cap = ImageFolderSource(folder.root, max_pixels=1000)
    with pytest.raises(BadImageError, match=r"exceed the limit of 1000 \(max_image_pixels\)"):
        small_cap.load(folder.images.index("class_a/img_00.jpg"))
    assert set(decoded) == {str(folder.root / "class_b/rgba.png")}


@pytest.mark.parametrize("name", ["class_b/rgba.png", "class_b/palette_transparent.png"])
def test_transparency_is_composited_on_the_fixed_background(folder, name):
    pixels = np.asarray(ImageFolderSource(folder.root).load(folder.images.index(name)))
    assert pixels.shape == (10, 20, 3)
    assert (pixels[:, :10] == BACKGROUND).all()  # alpha 0: the background, never the stored colour
    assert (pixels[:, 10:] == OPAQUE_COLOUR).all()
    assert not (pixels == HIDDEN_COLOUR).all(axis=-1).any()


def test_sixteen_bit_is_rescaled_not_clipped(folder):
    pixels = np.asarray(ImageFolderSource(folder.root).load(folder.images.index("class_b/sixteen_bit.png")))
    # stored values 0, 32896, 65535 in blocks of 12 columns; / 257 -> 0, 128, 255 (clipping would give 0, 255, 255)
    assert pixels[0, ::12, 0].tolist() == [0, 128, 255]
    assert (pixels == pixels[..., :1]).all()  # gray: the three channels agree


def test_an_epoch_with_two_workers_replaces_bad_samples_deterministically(folder):
    source = ImageFolderSource(folder.root)
    geometry = MultiCropGeometry(**GEOMETRY)
    dataset = MultiCropDataset(source, geometry, seed=5)
    plan = BatchPlan(per_device_batch=4, grad_accum_steps=1, num_processes=1)
    num_steps = math.ceil(len(source) / plan.global_batch)  # one epoch: 7 steps, 3 padded samples
    sampler = StepSampler(len(source), plan, rank=0, seed=5, start_step=0, total_steps=num_steps)
    loader = DataLoader(dataset, sampler=sampler, batch_size=4, num_workers=2, worker_init_fn=worker_init(["SIGTERM"]))
    photometric = MultiCropPhotometric()
    skips = _expected_skips(folder)
    seen, reports = [], []
    for batch in loader:
        global_in, local_in = photometric(batch["global_views"], batch["local_views"], batch["photometric_params"])
        assert global_in.shape == (2 * 4, 3, 16, 16) and local_in.shape == (2 * 4, 3, 8, 8)
        assert torch.isfinite(global_in).all() and torch.isfinite(local_in).all()
        boxes = batch["boxes"]
        assert boxes.shape == (4, 4, 4) and torch.isfinite(boxes).all()
        assert ((boxes >= 0) & (boxes <= 1)).all()
        for index, skipped in zip(batch["index"].tolist(), batch["skipped"].tolist(), strict=True):
            assert skipped == skips[index], folder.images[index]
        seen += batch["index"].tolist()
        reports.append(torch.stack([batch["index"], batch["skipped"]], dim=1))
    assert len(seen) == num_steps * 4 and set(seen) == set(range(len(source)))
    # a bad index takes the next good file, with its own (seed, epoch, index) draws: the same in any worker
    bad = folder.images.index("class_a/img_09t.jpg")
    replacement = bad + 3  # img_09t and the two bombs are bad; cmyk.jpg is next
    assert folder.images[replacement] == "class_b/cmyk.jpg"
    direct = geometry(source.load(replacement), sample_generator(5, 0, bad))
    for key in ("global_views", "local_views", "boxes", "photometric_params"):
        assert torch.equal(dataset[(0, bad)][key], direct[key])
    wrapped = dataset[(0, folder.images.index("class_z/text.jpg"))]  # the last two files: wraps to the first
    assert wrapped["skipped"].item() == 2
    quarantine = Quarantine(source, folder.root.parent / "q.tsv", max_fraction=1.0, load_existing=False)
    indices, skipped = torch.cat(reports).T.tolist()
    assert [folder.images[i] for i in quarantine.add(indices, skipped)] == sorted(folder.bad)


def test_the_quarantine_file_is_the_same_whatever_order_the_files_are_found_in(folder, tmp_path):
    source = ImageFolderSource(folder.root)
    skips = _expected_skips(folder)
    every = list(range(len(source)))
    orders = {"forward": every, "backward": every[::-1], "twice_interleaved": every[1::2] + every + every[::2]}
    written = {}
    for name, order in orders.items():
        path = tmp_path / f"{name}.tsv"
        quarantine = Quarantine(source, path, max_fraction=1.0, load_existing=False)
        for start in range(0, len(order), 3):  # reports arrive a few samples at a time, as steps do
            chunk = order[start : start + 3]
            quarantine.add(chunk, [skips[i] for i in chunk])
        quarantine.write()
        written[name] = path.read_bytes()
    assert len(set(written.values())) == 1
    names, reasons = _quarantined(tmp_path / "forward.tsv")
    assert names == sorted(folder.bad)  # each bad file once, sorted by path
    assert all(reasons)
    # a resumed run starts from the list and adds the rest: the same file again
    resumed_path = tmp_path / "resumed.tsv"
    first = Quarantine(source, resumed_path, max_fraction=1.0, load_existing=False)
    first.add(every[:13], [skips[i] for i in every[:13]])
    first.write()
    resumed = Quarantine(source, resumed_path, max_fraction=1.0, load_existing=True)
    assert len(resumed) == len(first)
    resumed.add(every, [skips[i] for i in every])
    resumed.write()
    assert resumed_path.read_bytes() == written["forward"]


def test_above_the_bad_fraction_the_quarantine_stops_the_run(folder, tmp_path):
    source = ImageFolderSource(folder.root)
    bad = [folder.images.index(name) for name in folder.bad]
    quarantine = Quarantine(source, tmp_path / QUARANTINE_FILE, max_fraction=0.2, load_existing=False)
    quarantine.add(bad[:5], [1] * 5)  # 5 of 25 = 0.2: allowed
    quarantine.check()
    quarantine.add(bad[5:6], [1])
    with pytest.raises(BadDataError, match=r"6 of the 25 image files .* \(24\.00%\), more than max_bad_fraction=0\.2"):
        quarantine.check()
    with pytest.raises(ValueError, match="max_fraction"):
        Quarantine(source, tmp_path / "x.tsv", max_fraction=1.5, load_existing=False)


def _train_on(folder, output_dir, *extra):
    from tests.test_pretrain import TINY
    from training.pretrain import main

    return main(["--recipe", "demo", *TINY, f"data={folder.root}", "epochs=1", f"output_dir={output_dir}", *extra])


def test_training_over_the_bad_folder_with_two_workers_lists_the_bad_files(folder, tmp_path):
    result = _train_on(folder, tmp_path, "num_workers=2", "max_bad_fraction=0.5", "checkpoint_every=100")
    assert result.step == 7 and not result.preempted  # ceil(25 / 4) steps: the epoch completed
    names, _ = _quarantined(tmp_path / QUARANTINE_FILE)
    assert names == sorted(folder.bad)
    for name, tensor in result.model.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name


def test_too_many_bad_files_stop_the_run_instead_of_training_on_replacements(folder, tmp_path):
    message = r"at step \d+: \d+ of the 25 image files .* more than max_bad_fraction=0\.2"
    with pytest.raises(BadDataError, match=message):
        _train_on(folder, tmp_path, "max_bad_fraction=0.2", "checkpoint_every=100")
    names, _ = _quarantined(tmp_path / QUARANTINE_FILE)
    assert len(names) > 0.2 * 25 and set(names) <= set(folder.bad)
    assert ckpt.latest_checkpoint(tmp_path) is None  # stopped within the epoch, before its final checkpoint


@pytest.mark.slow
def test_the_quarantine_file_repeats_across_runs_and_after_a_resume(folder, tmp_path):
    settings = ("num_workers=2", "max_bad_fraction=0.5", "checkpoint_every=100")
    _train_on(folder, tmp_path / "first", *settings)
    _train_on(folder, tmp_path / "second", *settings)
    _train_on(folder, tmp_path / "resumed", *settings, "max_steps=3")
    _train_on(folder, tmp_path / "resumed", *settings, "resume=auto")
    first = (tmp_path / "first" / QUARANTINE_FILE).read_bytes()
    assert (tmp_path / "second" / QUARANTINE_FILE).read_bytes() == first
    assert (tmp_path / "resumed" / QUARANTINE_FILE).read_bytes() == first
