"""Clips: T consecutive thin slices over an H x W crop, with the T/k thick slices that sit on them.

A clip starts at a thin index z0 that is a multiple of the thick factor k, so thick slice j (which lies on thin
slice j*k) is the first thick frame when j = z0/k and the clip holds thick slices z0/k .. z0/k + T/k - 1. Both
are scaled to [0, 1] by ctv2v.intensity.Intensity. Regions beyond a volume's edge (a volume smaller than the
crop, or a last tile that reaches past the final thin slice) lie at the high-index end of each axis, so `origin`
is always a voxel index of the unpadded volume: in-plane they are filled with hu_min (air, 0 after scaling),
along the slice axis they repeat the last slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ctv2v.config import AugmentConfig, ClipConfig, ThickConfig
from ctv2v.data.augment import MIN_THICK_SLICES, training_views
from ctv2v.data.cache import Preprocessed
from ctv2v.data.interpolation import Interpolation
from ctv2v.intensity import Intensity


@dataclass(frozen=True)
class Tile:
    """A clip position: thin slices z0 .. z0+frames-1, rows y0 .. y0+height-1, columns x0 .. x0+width-1."""

    z0: int
    y0: int
    x0: int
    frames: int
    height: int
    width: int
    factor: int

    @property
    def thick_start(self) -> int:
        """Index of the clip's first thick slice."""
        return self.z0 // self.factor

    @property
    def thick_frames(self) -> int:
        """Number of thick slices in the clip."""
        return self.frames // self.factor


def check_frames(frames: int, factor: int) -> None:
    """Raise ValueError unless a clip of `frames` thin slices holds a whole number of thick slices."""
    if factor < 1 or frames % factor:
        raise ValueError(f"data.clip.frames={frames} must be a multiple of the thick factor {factor} "
                         "(each thick slice stands for factor thin slices)")


def _crop(array: np.ndarray, starts: tuple[int, ...], sizes: tuple[int, ...], fill: float) -> np.ndarray:
    """array[starts : starts + sizes]; in-plane, the part beyond the array's end is `fill`; along the slice axis,
    frames beyond the last slice repeat it (a convolution along z then sees the volume continue, as replicate
    padding does, instead of a wall of air after the last slab)."""
    out = np.full(sizes, fill, dtype=np.float32)
    inside = tuple(slice(s, min(s + n, dim)) for s, n, dim in zip(starts, sizes, array.shape))
    real_frames = inside[0].stop - inside[0].start
    out[tuple(slice(0, sl.stop - sl.start) for sl in inside)] = array[inside]
    if 0 < real_frames < sizes[0]:
        out[real_frames:] = out[real_frames - 1]
    return out


def extract_clip(volume: Preprocessed, tile: Tile, intensity: Intensity, interpolated: np.ndarray | None = None,
                 hu_scale: float = 1.0, hu_offset: float = 0.0) -> dict[str, np.ndarray]:
    """The thin (T, H, W) and thick (T/k, H, W) clip at `tile`, scaled to [0, 1]; also the interpolated one
    (`interp`, T x H x W) when the volume's interpolation (Interpolation.of) is given. `hu_scale` and
    `hu_offset` jitter the HU values before the window (HU * hu_scale + hu_offset; linear, so the thick and
    interpolated clips stay those of the jittered thin one)."""
    if tile.factor != volume.thick.factor:
        raise ValueError(f"tile factor {tile.factor} differs from volume {volume.volume_id}'s thick factor "
                         f"{volume.thick.factor}")
    def window(hu: np.ndarray) -> np.ndarray:
        return intensity.to_unit(hu * hu_scale + hu_offset if (hu_scale, hu_offset) != (1.0, 0.0) else hu)

    thin = _crop(volume.thin, (tile.z0, tile.y0, tile.x0), (tile.frames, tile.height, tile.width),
                 intensity.hu_min)
    thick = _crop(volume.thick.array, (tile.thick_start, tile.y0, tile.x0),
                  (tile.thick_frames, tile.height, tile.width), intensity.hu_min)
    clip = {"thin": window(thin), "thick": window(thick)}
    if interpolated is not None:
        if interpolated.shape != volume.thin.shape:
            raise ValueError(f"interpolated volume {interpolated.shape} differs from volume {volume.volume_id}'s "
                             f"thin shape {volume.thin.shape}")
        clip["interp"] = window(_crop(interpolated, (tile.z0, tile.y0, tile.x0),
                                      (tile.frames, tile.height, tile.width), intensity.hu_min))
    return clip


def _starts(extent: int, size: int, stride: int) -> list[int]:
    """Tile starts from 0 to the last start `extent - size` (0 if the tile is larger), `stride` apart."""
    last = max(extent - size, 0)
    return list(range(0, last, stride)) + [last]


def eval_tiles(shape: tuple[int, int, int], clip: ClipConfig, factor: int, n_thick: int | None = None) -> list[Tile]:
    """Overlapping clip-sized tiles covering thin slices 0 .. (n_thick-1)*k and the full in-plane extent of `shape`.

    Neighbouring tiles overlap by about `clip.eval_overlap` of the tile size (z strides rounded down to a
    multiple of k, at least k); see covering_tiles.
    """
    check_frames(clip.frames, factor)
    z_stride = max(factor, int(clip.frames * (1 - clip.eval_overlap)) // factor * factor)
    y_stride = max(1, int(clip.height * (1 - clip.eval_overlap)))
    x_stride = max(1, int(clip.width * (1 - clip.eval_overlap)))
    return covering_tiles(shape, (clip.frames, clip.height, clip.width), (z_stride, y_stride, x_stride), factor,
                          n_thick)


def covering_tiles(shape: tuple[int, int, int], size: tuple[int, int, int], strides: tuple[int, int, int],
                   factor: int, n_thick: int | None = None) -> list[Tile]:
    """Tiles of `size` (frames, height, width), `strides` apart, covering thin slices 0 .. (n_thick-1)*k and the
    full in-plane extent of `shape`.

    `shape` is the thin volume's; `n_thick` defaults to the simulated count ceil(slices / k) (give it for a
    real paired series). z starts are multiples of k (the z stride must be one), and the last tile in z ends
    with the k thin slices of the last thick slice, so every tile's thick slices exist.
    """
    frames, height, width = size
    check_frames(frames, factor)
    if strides[0] % factor:
        raise ValueError(f"z stride {strides[0]} is not a multiple of the thick factor {factor}: tiles must start on "
                         "thick slices")
    slices, rows, cols = shape
    n_thick = -(-slices // factor) if n_thick is None else n_thick
    return [Tile(z0, y0, x0, frames, height, width, factor)
            for z0 in _starts(n_thick * factor, frames, strides[0])
            for y0 in _starts(rows, height, strides[1])
            for x0 in _starts(cols, width, strides[2])]


@dataclass(frozen=True)
class ClipDraw:
    """Where one training clip comes from and how it is augmented."""

    view: int
    """Index into the volume's training views (ctv2v.data.augment; 0 is the volume itself)."""
    tile: Tile
    flip_rows: bool = False
    flip_cols: bool = False
    transpose: bool = False
    """Rows and columns swapped (square crops only)."""
    hu_scale: float = 1.0
    hu_offset: float = 0.0


class TrainClips(Dataset):
    """Random training clips: `clip.clips_per_volume` per volume, random crop and augmentation (data.augment).

    Each clip draws one of the volume's training views (with slab_phases / axes: every slab phase, every axis as
    the slice axis, ctv2v.data.augment; else the volume itself), a crop, flips of both in-plane axes and a
    transpose of square crops, and an HU jitter (scale and offset, applied in HU before the intensity window).
    With `interpolation`, items also hold the clip of the view's interpolation (`interp`, augmented alike).

    Item i of epoch e depends only on (seed, e, i), so a resumed run sees exactly the clips it would have
    seen. Call set_epoch(e) before iterating (before a DataLoader creates its worker processes).
    """

    def __init__(self, volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, seed: int,
                 interpolation: Interpolation | None = None, augment: AugmentConfig = AugmentConfig(),
                 thick: ThickConfig | None = None, slice_axes: tuple[int, ...] | None = None):
        """`thick` (data.thick) simulates the views; without it, the volumes' own thick series' settings do."""
        if not volumes:
            raise ValueError("TrainClips needs at least one volume")
        for volume in volumes:
            check_frames(clip.frames, volume.thick.factor)
        self.clip = clip
        self.intensity = intensity
        self.seed = seed
        self.augment = augment
        self.views = [training_views(volume, augment, thick, slice_axes) for volume in volumes]
        empty = [volume.volume_id for volume, views in zip(volumes, self.views) if not views]
        if empty:
            raise ValueError(f"TrainClips: no training view of {empty} along slice axes {slice_axes}: every axis is "
                             f"too short for {MIN_THICK_SLICES} thick slices")
        self.interpolated = ([[interpolation.of(view) for view in views] for views in self.views]
                             if interpolation is not None else None)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose clips the dataset returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.views) * self.clip.clips_per_volume

    def draw(self, index: int) -> ClipDraw:
        """Item `index`'s view, position and augmentation."""
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        views = self.views[index // self.clip.clips_per_volume]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        view_index = int(rng.integers(0, len(views))) if len(views) > 1 else 0
        volume = views[view_index]
        k = volume.thick.factor
        clip = self.clip
        # The clip's thick slices must exist and, where the volume is long enough, so must its thin slices.
        last_thick_start = max(min(volume.thick.array.shape[0] - clip.frames // k,
                                   (volume.thin.shape[0] - clip.frames) // k), 0)
        z0 = int(rng.integers(0, last_thick_start + 1)) * k
        y0 = int(rng.integers(0, max(volume.thin.shape[1] - clip.height, 0) + 1))
        x0 = int(rng.integers(0, max(volume.thin.shape[2] - clip.width, 0) + 1))
        tile = Tile(z0, y0, x0, clip.frames, clip.height, clip.width, k)
        augment = self.augment
        flip_rows, flip_cols, transpose = (bool(f) for f in rng.random(3) < 0.5) if augment.flips else (False,) * 3
        return ClipDraw(view_index, tile, flip_rows, flip_cols, transpose and clip.height == clip.width,
                        hu_scale=float(1.0 + augment.hu_scale * rng.uniform(-1.0, 1.0)),
                        hu_offset=float(augment.hu_offset * rng.uniform(-1.0, 1.0)))

    def __getitem__(self, index: int) -> dict:
        draw = self.draw(index)
        volume_index = index // self.clip.clips_per_volume
        volume = self.views[volume_index][draw.view]
        arrays = extract_clip(volume, draw.tile, self.intensity,
                              self.interpolated[volume_index][draw.view] if self.interpolated is not None else None,
                              hu_scale=draw.hu_scale, hu_offset=draw.hu_offset)
        axes = [axis for axis, flip in ((1, draw.flip_rows), (2, draw.flip_cols)) if flip]
        item = {}
        for name, array in arrays.items():
            array = np.flip(array, axes) if axes else array
            array = array.transpose(0, 2, 1) if draw.transpose else array
            item[name] = torch.from_numpy(np.ascontiguousarray(array))[None]
        item["volume_id"] = volume.volume_id
        item["origin"] = (draw.tile.z0, draw.tile.y0, draw.tile.x0)
        return item
