"""The streaming source: webdataset shards split over processes, deterministic views."""

from __future__ import annotations

import io
import itertools
import tarfile

import pytest
import torch
from PIL import Image

from clove_timm.views import MultiCropGeometry
from training.data import WebDatasetSource

pytest.importorskip("webdataset")


def _write_shards(folder, num_shards=4, per_shard=3):
    keys = []
    for s in range(num_shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i}"
                buffer = io.BytesIO()
                Image.new("RGB", (20 + i, 16 + s), (s * 40, i * 60, 90)).save(buffer, format="JPEG")
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
                keys.append(key)
    return f"{folder}/shard-{{0000..{num_shards - 1:04d}}}.tar", keys


def _take(source, n):
    return list(itertools.islice(iter(source), n))


def test_shards_are_split_over_processes_and_views_are_deterministic(tmp_path):
    urls, keys = _write_shards(tmp_path)
    geometry = MultiCropGeometry(global_size=16, local_size=8, num_local=2)
    ranks = [WebDatasetSource(urls, geometry, seed=0, rank=r, world_size=2, start_epoch=0) for r in (0, 1)]
    first_epoch = [_take(source, 6) for source in ranks]  # 2 shards x 3 samples per rank
    indices = [{s["index"].item() for s in samples} for samples in first_epoch]
    assert not indices[0] & indices[1]
    assert len(indices[0] | indices[1]) == len(keys)
    for sample in first_epoch[0]:
        assert sample["global_views"].shape == (2, 3, 16, 16) and sample["local_views"].shape == (2, 3, 8, 8)
        assert sample["boxes"].min() >= 0 and sample["boxes"].max() <= 1
    again = _take(WebDatasetSource(urls, geometry, seed=0, rank=0, world_size=2, start_epoch=0), 6)
    assert all(torch.equal(a["global_views"], b["global_views"]) for a, b in zip(first_epoch[0], again, strict=True))
    reseeded = _take(WebDatasetSource(urls, geometry, seed=1, rank=0, world_size=2, start_epoch=0), 6)
    assert any(not torch.equal(a["boxes"], b["boxes"]) for a, b in zip(first_epoch[0], reseeded, strict=True))


def test_stream_continues_into_the_next_epoch(tmp_path):
    urls, keys = _write_shards(tmp_path, num_shards=2, per_shard=2)
    geometry = MultiCropGeometry(global_size=16, local_size=8, num_local=0)
    samples = _take(WebDatasetSource(urls, geometry, seed=0, rank=0, world_size=1, start_epoch=0), 2 * len(keys))
    first, second = samples[: len(keys)], samples[len(keys) :]
    assert {s["index"].item() for s in first} == {s["index"].item() for s in second}
    assert any(not torch.equal(a["boxes"], b["boxes"]) for a, b in zip(first, second, strict=True))  # new epoch


def test_too_few_shards_for_the_processes(tmp_path):
    urls, _ = _write_shards(tmp_path, num_shards=1, per_shard=1)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 processes"):
        WebDatasetSource(urls, MultiCropGeometry(), seed=0, rank=0, world_size=2, start_epoch=0)
