"""Procedural images of coloured shapes on textured backgrounds, with exact dense labels.

The built-in dataset is made of these, so that training, evaluation and tests run anywhere without downloading
data. Shape colour and texture are drawn independently of the class, so a shape's class can only be told from
its geometry; the background is textured (gratings + smooth noise) so that edges alone do not give shapes away.
Everything is drawn from the caller's `numpy.random.Generator`, so a sample is a pure function of its seed.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "star")
"""Class names; the index of a name is its label id in seg maps and in the per-image class."""

_MIN_IMAGE_SIZE = 8
_MIN_CONTRAST = 90.0  # RGB distance from the background's mean colour, so shapes stay visible


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Random values on a coarse `cells` x `cells` grid, bilinearly upsampled to (size, size) in [-1, 1]."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _gratings(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Sum of `count` randomly oriented sinusoidal gratings, normalised to [-1, 1]. Shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = np.zeros((size, size), np.float32)
    for _ in range(count):
        theta = rng.uniform(0.0, math.pi)
        cycles = rng.uniform(1.0, 6.0)  # per image width: coarse enough to survive small image sizes
        phase = rng.uniform(0.0, 2.0 * math.pi)
        field += np.sin(2.0 * math.pi * cycles * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    return field / count


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two random colours mixed by gratings and smooth noise. Returns float32 (size, size, 3) in [0, 255]."""
    colours = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    grating = _gratings(rng, size, count=int(rng.integers(1, 3)))
    noise = _smooth_noise(rng, size, cells=int(rng.integers(3, 7)))
    mix = np.clip(0.5 + 0.3 * rng.uniform(0.3, 1.0) * grating + 0.3 * noise, 0.0, 1.0)[..., None]  # (S, S, 1)
    return colours[0] * (1.0 - mix) + colours[1] * mix


def _shape_points(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon or star with circumradius `radius`, rotated by `angle` radians."""
    if kind == "star":
        radii = [radius if i % 2 == 0 else 0.45 * radius for i in range(10)]
    else:
        radii = [radius] * {"square": 4, "triangle": 3}[kind]
    step = 2.0 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + i * step), cy + r * math.sin(angle + i * step)) for i, r in enumerate(radii)]


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape, drawn without antialiasing so labels are exact."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        draw.polygon(_shape_points(kind, cx, cy, radius, angle), fill=1)
    return np.asarray(mask, dtype=bool)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background (a few redraws at most; deterministic)."""
    colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    for _ in range(8):
        if np.linalg.norm(colour - background_mean) >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    return colour


def render_sample(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw one image of 1-4 random shapes on a textured background, with its dense label map.

    Shapes are drawn in order, so later shapes occlude earlier ones in both the image and the labels.

    Args:
        rng: Source of all randomness; the same generator state gives the same sample.
        image_size: Side length S of the square image, at least 8.

    Returns:
        image: uint8 RGB image. Shape (S, S, 3).
        seg: uint8 label map, the `SHAPE_CLASSES` index of every pixel (0 = background). Shape (S, S).
        cls: class id of the shape with the most visible pixels (0 only if no shape is visible at all).
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    size = image_size
    image = _background(rng, size)  # (S, S, 3) float32
    seg = np.zeros((size, size), np.uint8)
    instance = np.zeros((size, size), np.uint8)  # which shape owns each pixel, to find the dominant one
    background_mean = image.mean(axis=(0, 1))
    shape_classes = []
    for index in range(int(rng.integers(1, 5))):
        label = int(rng.integers(1, len(SHAPE_CLASSES)))
        radius = max(3.0, rng.uniform(0.12, 0.3) * size)
        cx, cy = rng.uniform(0.5 * radius, size - 0.5 * radius, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        mask = _shape_mask(SHAPE_CLASSES[label], size, cx, cy, radius, angle)
        # A faint grating on the shape keeps its interior from being a flat, trivially segmentable colour.
        shading = 1.0 + 0.12 * _gratings(rng, size, count=1)[..., None]
        image = np.where(mask[..., None], _shape_colour(rng, background_mean) * shading, image)
        seg[mask] = label
        instance[mask] = index + 1
        shape_classes.append(label)
    visible = np.bincount(instance.ravel(), minlength=len(shape_classes) + 1)
    visible[0] = 0
    dominant = int(np.argmax(visible))
    cls = shape_classes[dominant - 1] if visible[dominant] > 0 else 0
    return np.clip(image, 0.0, 255.0).round().astype(np.uint8), seg, cls
