"""Training clips and evaluation tiles: shapes, alignment of thick to thin, flips, determinism, coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctv2v.config import AugmentConfig, ClipConfig, ThickConfig
from ctv2v.data import read_volume
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import TrainClips, eval_tiles, extract_clip
from ctv2v.data.thick import simulate_thick
from ctv2v.intensity import Intensity

INTENSITY = Intensity(-1000.0, 1000.0)


def _preprocessed(thin: np.ndarray, thick: ThickConfig, volume_id: str = "v") -> Preprocessed:
    return Preprocessed(volume_id, thin.astype(np.float32), simulate_thick(thin, 1.0, thick), (1.0, 1.0, 1.0),
                        np.eye(4))


@pytest.fixture(scope="module")
def real_small(demo_dir) -> np.ndarray:
    return read_volume(demo_dir / "example_ct_sm.nii.gz").array  # (30, 101, 122), 3 mm


def test_item_shapes_and_range(real_small):
    clip = ClipConfig(frames=8, height=32, width=48, clips_per_volume=3)
    volumes = [_preprocessed(real_small, ThickConfig(factor=4), "a"),
               _preprocessed(real_small[:17], ThickConfig(factor=4), "b")]
    dataset = TrainClips(volumes, clip, INTENSITY, seed=0)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["thin"].shape == (1, 8, 32, 48) and item["thin"].dtype == torch.float32
        assert item["thick"].shape == (1, 2, 32, 48)
        assert 0.0 <= item["thin"].min() and item["thin"].max() <= 1.0
        assert item["volume_id"] == ("a" if i < 3 else "b")
        z0, y0, x0 = item["origin"]
        assert z0 % 4 == 0 and z0 + 8 <= volumes[i // 3].thin.shape[0]
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["thin"].shape == (2, 1, 8, 32, 48) and batch["volume_id"] == ["a", "a"]


def test_frames_must_be_a_multiple_of_the_factor(real_small):
    volume = _preprocessed(real_small, ThickConfig(factor=3))
    with pytest.raises(ValueError, match=r"data.clip.frames=8 must be a multiple of the thick factor 3"):
        TrainClips([volume], ClipConfig(frames=8, height=16, width=16), INTENSITY, seed=0)
    with pytest.raises(ValueError, match=r"data.clip.frames=16 must be a multiple of the thick factor 3"):
        eval_tiles((30, 64, 64), ClipConfig(frames=16), 3)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_subsampled_thick_frames_equal_every_kth_thin_frame_after_flips(real_small, k):
    """Alignment and identical flips: with `subsample`, thick frame m is thin frame m*k of the same clip."""
    clip = ClipConfig(frames=4 * k, height=24, width=24, clips_per_volume=16)
    dataset = TrainClips([_preprocessed(real_small, ThickConfig(method="subsample", factor=k))], clip, INTENSITY, 5)
    flips = set()
    for i in range(len(dataset)):
        item = dataset[i]
        torch.testing.assert_close(item["thick"], item["thin"][:, ::k], rtol=0, atol=0)
        draw = dataset.draw(i)
        flips.add((draw.flip_rows, draw.flip_cols, draw.transpose))
    assert {f[:2] for f in flips} == {(False, False), (False, True), (True, False), (True, True)}
    assert {f[2] for f in flips} == {False, True}


def test_flip_really_flips_the_crop(real_small):
    volume = _preprocessed(real_small, ThickConfig(factor=2))
    dataset = TrainClips([volume], ClipConfig(frames=4, height=20, width=30, clips_per_volume=12), INTENSITY, 1)
    flipped = 0
    for i in range(len(dataset)):
        draw = dataset.draw(i)
        assert not draw.transpose  # 20 x 30 crops are not square
        plain = extract_clip(volume, draw.tile, INTENSITY)
        axes = [a for a, f in ((1, draw.flip_rows), (2, draw.flip_cols)) if f]
        expected = np.flip(plain["thin"], axes) if axes else plain["thin"]
        np.testing.assert_array_equal(dataset[i]["thin"][0].numpy(), expected)
        flipped += bool(axes) and not np.array_equal(expected, plain["thin"])
    assert flipped > 0


def test_transpose_swaps_rows_and_columns_of_square_crops(real_small):
    volume = _preprocessed(real_small, ThickConfig(factor=2))
    dataset = TrainClips([volume], ClipConfig(frames=4, height=24, width=24, clips_per_volume=12), INTENSITY, 2)
    transposed = [i for i in range(len(dataset)) if dataset.draw(i).transpose]
    assert transposed
    for i in transposed:
        draw = dataset.draw(i)
        plain = extract_clip(volume, draw.tile, INTENSITY)["thin"]
        axes = [a for a, f in ((1, draw.flip_rows), (2, draw.flip_cols)) if f]
        expected = (np.flip(plain, axes) if axes else plain).transpose(0, 2, 1)
        np.testing.assert_array_equal(dataset[i]["thin"][0].numpy(), expected)


def test_flips_off_keeps_every_crop_as_it_is(real_small):
    volume = _preprocessed(real_small, ThickConfig(factor=2))
    dataset = TrainClips([volume], ClipConfig(frames=4, height=24, width=24, clips_per_volume=8), INTENSITY, 2,
                         augment=AugmentConfig(flips=False))
    for i in range(len(dataset)):
        draw = dataset.draw(i)
        assert (draw.flip_rows, draw.flip_cols, draw.transpose) == (False, False, False)
        np.testing.assert_array_equal(dataset[i]["thin"][0].numpy(), extract_clip(volume, draw.tile, INTENSITY)["thin"])


def test_items_depend_only_on_seed_epoch_and_index(real_small):
    clip = ClipConfig(frames=8, height=16, width=16, clips_per_volume=6)
    volumes = [_preprocessed(real_small, ThickConfig(factor=4))]
    first, second = TrainClips(volumes, clip, INTENSITY, 3), TrainClips(volumes, clip, INTENSITY, 3)
    first.set_epoch(2)
    second.set_epoch(2)
    for i in reversed(range(len(first))):  # order of access does not matter
        assert first.draw(i) == second.draw(i)
        torch.testing.assert_close(first[i]["thin"], second[i]["thin"], rtol=0, atol=0)
    epoch_2 = [first.draw(i) for i in range(len(first))]
    first.set_epoch(3)
    assert [first.draw(i) for i in range(len(first))] != epoch_2
    assert [TrainClips(volumes, clip, INTENSITY, 4).draw(i) for i in range(6)] != [second.draw(i) for i in range(6)]


def test_volume_smaller_than_the_crop_is_air_in_plane_and_repeats_its_last_slice_along_z():
    thin = np.full((6, 10, 12), 40.0, dtype=np.float32)  # 40 HU everywhere
    thin[5] = 100.0
    volume = _preprocessed(thin, ThickConfig(method="subsample", factor=2))
    item = TrainClips([volume], ClipConfig(frames=8, height=16, width=16), INTENSITY, 0,
                      augment=AugmentConfig(flips=False))[0]
    assert item["origin"] == (0, 0, 0)
    expected = np.zeros((8, 16, 16), np.float32)
    expected[:5, :10, :12] = INTENSITY.to_unit(np.float32(40.0))
    expected[5:, :10, :12] = INTENSITY.to_unit(np.float32(100.0))
    np.testing.assert_allclose(item["thin"][0].numpy(), expected)
    # Thick slices 0, 1, 2 lie on thin 0, 2, 4; the fourth frame repeats the third.
    assert item["thick"].shape == (1, 4, 16, 16)
    np.testing.assert_array_equal(item["thick"][0, 3].numpy(), item["thick"][0, 2].numpy())
    assert float(item["thick"][0, 3, 0, 0]) == INTENSITY.to_unit(np.float32(40.0))


@pytest.mark.parametrize("shape, k, clip", [
    ((30, 101, 122), 4, ClipConfig(frames=8, height=32, width=48, eval_overlap=0.25)),
    ((17, 40, 40), 4, ClipConfig(frames=16, height=16, width=16, eval_overlap=0.5)),
    ((9, 20, 20), 2, ClipConfig(frames=16, height=32, width=32, eval_overlap=0.0)),  # smaller than a tile
    ((112, 64, 70), 3, ClipConfig(frames=12, height=64, width=64, eval_overlap=0.9)),
])
def test_eval_tiles_cover_the_thick_span(shape, k, clip):
    tiles = eval_tiles(shape, clip, k)
    assert tiles == eval_tiles(shape, clip, k)
    n_thick = -(-shape[0] // k)
    covered = np.zeros((n_thick * k, shape[1], shape[2]), dtype=np.int32)
    for tile in tiles:
        assert tile.z0 % k == 0 and (tile.frames, tile.height, tile.width) == (clip.frames, clip.height, clip.width)
        assert tile.thick_start + tile.thick_frames <= max(n_thick, tile.thick_frames)
        covered[tile.z0:tile.z0 + tile.frames, tile.y0:tile.y0 + tile.height, tile.x0:tile.x0 + tile.width] += 1
    assert covered[: (n_thick - 1) * k + 1].min() >= 1
    if clip.eval_overlap > 0 and shape[1] > clip.height:
        assert covered.max() > 1


def test_eval_tile_clips_align_thick_and_thin(real_small):
    volume = _preprocessed(real_small, ThickConfig(method="subsample", factor=4))
    clip = ClipConfig(frames=8, height=64, width=64)
    for tile in eval_tiles(volume.thin.shape, clip, 4):
        arrays = extract_clip(volume, tile, INTENSITY)
        real = min(tile.frames, volume.thin.shape[0] - tile.z0)
        np.testing.assert_array_equal(arrays["thick"][: -(-real // 4)], arrays["thin"][:real:4])
