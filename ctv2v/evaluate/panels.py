"""One PNG per test volume: a coronal or sagittal reformat, where slice interpolation shows.

Columns: the thick input (nearest-upsampled so its slabs show as blocks), the model, linear interpolation,
the true thin series and the model's absolute error. Each image is resampled so one pixel covers the same
millimetres vertically and horizontally (the slice spacing differs from the in-plane spacing), windowed to
the HU range the metrics use, and drawn with the superior end at the top (ctv2v.data.readers orders slices
from inferior to superior, rows toward posterior and columns toward the patient's left, so the coronal view
is in radiological convention and the sagittal view has anterior on the left). Pillow only, no plotting library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctv2v.files import atomic_path

Plane = Literal["coronal", "sagittal"]
COLUMN_WIDTH_PX = 256
"""Every reformat is scaled to this width, so panels of volumes with different sizes read alike."""
ERROR_FRACTION_OF_WINDOW = 0.25
"""The error map's white point, as a fraction of the HU window width (|error| above it saturates)."""
FONT_SIZE = 14
MARGIN_PX = 6
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def reformat(volume: np.ndarray, plane: Plane) -> np.ndarray:
    """The (slice, in-plane) image through the middle of a (slice, row, col) volume."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slice, row, col), got shape {volume.shape}")
    if plane == "coronal":
        return volume[:, volume.shape[1] // 2, :]
    if plane == "sagittal":
        return volume[:, :, volume.shape[2] // 2]
    raise ValueError(f"unknown panel plane {plane!r}; expected 'coronal' or 'sagittal'")


def window_to_gray(image_hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """HU -> uint8 gray, black at hu_min and white at hu_max."""
    unit = np.clip((image_hu.astype(np.float64) - hu_min) / (hu_max - hu_min), 0.0, 1.0)
    return np.round(unit * 255).astype(np.uint8)


def hot_colormap(values: np.ndarray, white_point: float) -> np.ndarray:
    """Non-negative values -> (H, W, 3) uint8 black-red-yellow-white, saturating at `white_point`."""
    t = np.clip(values / white_point, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _to_display(pixels: np.ndarray, slice_mm: float, inplane_mm: float) -> Image.Image:
    """Scale to COLUMN_WIDTH_PX wide with square millimetres, the last (most superior) slice at the top."""
    image = Image.fromarray(np.ascontiguousarray(pixels[::-1]))
    n_slices, width = pixels.shape[:2]
    px_per_mm = COLUMN_WIDTH_PX / (width * inplane_mm)
    height = max(1, round(n_slices * slice_mm * px_per_mm))
    # Nearest when enlarging keeps voxels (and thick slabs) visible as they are; area-averaging when shrinking.
    resample = Image.Resampling.NEAREST if COLUMN_WIDTH_PX >= width else Image.Resampling.BOX
    return image.resize((COLUMN_WIDTH_PX, height), resample=resample)


def render_panel(
    *,
    thick_nearest_hu: np.ndarray,
    model_hu: np.ndarray,
    linear_hu: np.ndarray,
    target_hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    hu_min: float,
    hu_max: float,
    plane: Plane,
    title_lines: list[str],
    start_hu: np.ndarray | None = None,
) -> Image.Image:
    """The panel image of (slice, row, col) HU volumes of the same shape, with a title block and column labels.

    With `start_hu` (the interpolation the model starts from) a last column shows |model - start|: what the
    model changed, so texture invented in air or flat tissue is seen at once.
    """
    volumes = {"thick input (nearest)": thick_nearest_hu, "model": model_hu, "linear": linear_hu,
               "ground truth": target_hu}
    if start_hu is not None:
        volumes["model's start"] = start_hu
    for name, volume in volumes.items():
        if volume.shape != target_hu.shape:
            raise ValueError(f"panel volume '{name}' has shape {volume.shape}, ground truth has {target_hu.shape}")
    slice_mm = spacing_mm[0]
    inplane_mm = spacing_mm[2] if plane == "coronal" else spacing_mm[1]
    white_point = ERROR_FRACTION_OF_WINDOW * (hu_max - hu_min)
    columns = [
        (name, _to_display(window_to_gray(reformat(v, plane), hu_min, hu_max), slice_mm, inplane_mm).convert("RGB"))
        for name, v in volumes.items()
    ]
    model_clipped = np.clip(reformat(model_hu, plane), hu_min, hu_max)
    error = np.abs(model_clipped - np.clip(reformat(target_hu, plane), hu_min, hu_max))
    columns.append((f"|model - truth| 0-{white_point:g} HU",
                    _to_display(hot_colormap(error, white_point), slice_mm, inplane_mm)))
    if start_hu is not None:
        change = np.abs(model_clipped - np.clip(reformat(start_hu, plane), hu_min, hu_max))
        columns.append((f"|model - start| 0-{white_point:g} HU",
                        _to_display(hot_colormap(change, white_point), slice_mm, inplane_mm)))

    font = ImageFont.load_default(size=FONT_SIZE)
    line_px = FONT_SIZE + 4
    title_px = MARGIN_PX + line_px * len(title_lines)
    label_px = line_px + MARGIN_PX
    image_px = columns[0][1].height
    width = MARGIN_PX + len(columns) * (COLUMN_WIDTH_PX + MARGIN_PX)
    canvas = Image.new("RGB", (width, title_px + label_px + image_px + MARGIN_PX), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((MARGIN_PX, MARGIN_PX + i * line_px), line, fill=TEXT, font=font)
    for i, (label, column) in enumerate(columns):
        x = MARGIN_PX + i * (COLUMN_WIDTH_PX + MARGIN_PX)
        draw.text((x, title_px + MARGIN_PX), label, fill=TEXT, font=font)
        canvas.paste(column, (x, title_px + label_px))
    return canvas


def write_panel(path: Path, image: Image.Image) -> Path:
    """Save a panel as PNG atomically."""
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
