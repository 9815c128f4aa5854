"""Sampling, per-sample seeding and the image-folder source."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from clove_timm.views import MultiCropGeometry
from training.config import BatchPlan
from training.data import ImageFolderSource, MultiCropDataset, StepSampler, sample_generator


def _keys(num_samples, plan, rank=0, start=0, total=6, seed=0):
    return list(StepSampler(num_samples, plan, rank=rank, seed=seed, start_step=start, total_steps=total))


def test_every_sample_once_per_epoch_apart_from_padding():
    plan = BatchPlan(per_device_batch=4, grad_accum_steps=2, num_processes=1)  # global batch 8
    keys = _keys(21, plan, total=6)  # ceil(21 / 8) = 3 steps per epoch -> 2 epochs
    for epoch in (0, 1):
        counts = Counter(i for e, i in keys if e == epoch)
        assert set(counts) == set(range(21))
        assert sum(counts.values()) == 24 and sum(c - 1 for c in counts.values()) == 3  # 3 padded repeats


def test_epoch_order_differs_between_epochs_and_repeats_with_the_seed():
    plan = BatchPlan(per_device_batch=5, grad_accum_steps=1, num_processes=1)
    keys = _keys(20, plan, total=8)
    epoch0 = [i for e, i in keys if e == 0]
    epoch1 = [i for e, i in keys if e == 1]
    assert epoch0 != epoch1
    assert keys == _keys(20, plan, total=8)
    assert keys != _keys(20, plan, total=8, seed=1)


def test_two_processes_split_each_micro_batch_of_one_process():
    one = BatchPlan(per_device_batch=8, grad_accum_steps=2, num_processes=1)
    two = BatchPlan(per_device_batch=4, grad_accum_steps=2, num_processes=2)
    single = _keys(50, one, total=5)
    rank0, rank1 = _keys(50, two, rank=0, total=5), _keys(50, two, rank=1, total=5)
    for m in range(5 * 2):  # micro-batches
        block = single[m * 8 : (m + 1) * 8]
        assert rank0[m * 4 : (m + 1) * 4] == block[:4]
        assert rank1[m * 4 : (m + 1) * 4] == block[4:]


def test_two_ranks_together_see_every_sample_once_per_epoch_apart_from_padding():
    plan = BatchPlan(per_device_batch=3, grad_accum_steps=2, num_processes=2)  # global batch 12
    # 29 samples: ceil(29 / 12) = 3 steps per epoch = 36 slots, so 36 - 29 = 7 padded repeats per epoch
    rank0, rank1 = _keys(29, plan, rank=0, total=6, seed=4), _keys(29, plan, rank=1, total=6, seed=4)
    assert len(rank0) == len(rank1) == 6 * 6
    orders = {}
    for epoch in (0, 1):
        mine = [[i for e, i in keys if e == epoch] for keys in (rank0, rank1)]
        counts = Counter(mine[0] + mine[1])
        assert set(counts) == set(range(29)) and sum(counts.values()) == 36
        assert sorted(counts.values()) == [1] * 22 + [2] * 7  # 7 samples twice (the padding), the others once
        # one rank's share never repeats a sample outside the padding
        assert len(mine[0]) - len(set(mine[0])) + len(mine[1]) - len(set(mine[1])) <= 7
        orders[epoch] = mine
    assert orders[0] != orders[1]  # another order each epoch
    again = _keys(29, plan, rank=0, total=6, seed=4), _keys(29, plan, rank=1, total=6, seed=4)
    assert again == (rank0, rank1)  # the same seed, the same order in any run
    assert _keys(29, plan, rank=0, total=6, seed=5) != rank0


def test_starting_at_a_step_continues_the_same_sequence():
    plan = BatchPlan(per_device_batch=3, grad_accum_steps=2, num_processes=1)
    full = _keys(17, plan, total=9)
    resumed = _keys(17, plan, start=4, total=9)
    assert resumed == full[4 * 6 :]
    assert len(StepSampler(17, plan, rank=0, seed=0, start_step=4, total_steps=9)) == len(resumed)


def test_bad_sampler_arguments():
    plan = BatchPlan(1, 1, 2)
    with pytest.raises(ValueError, match="empty"):
        StepSampler(0, plan, rank=0, seed=0, start_step=0, total_steps=1)
    with pytest.raises(ValueError, match="rank 2"):
        StepSampler(4, plan, rank=2, seed=0, start_step=0, total_steps=1)


def test_sample_generator_depends_on_seed_epoch_and_index():
    draws = {k: torch.rand(4, generator=sample_generator(*k)) for k in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]}
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])
    assert torch.equal(draws[(0, 0, 1)], torch.rand(4, generator=sample_generator(0, 0, 1)))


def test_image_folder_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    for rel in ["b/x.JPG", "a/y.png", "a/z.jpeg", ".hidden/w.jpg", "a/.v.jpg", "a/notes.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.new("RGB", (8, 6), (10, 20, 30)).save(path, format="PNG" if rel.endswith("png") else "JPEG")
    source = ImageFolderSource(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in source.files] == ["a/y.png", "a/z.jpeg", "b/x.JPG"]
    assert source.load(0).size == (8, 6)
    dataset = MultiCropDataset(source, MultiCropGeometry(global_size=16, local_size=8, num_local=2), seed=3)
    a, b = dataset[(0, 1)], dataset[(0, 1)]
    assert torch.equal(a["global_views"], b["global_views"]) and a["index"].item() == 1
    assert not torch.equal(dataset[(1, 1)]["boxes"], a["boxes"])


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"no image files .* under {tmp_path}"):
        ImageFolderSource(tmp_path)
