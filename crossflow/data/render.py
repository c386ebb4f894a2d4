"""The synthetic world's renderer: textured sprites of 20 object classes over a textured canvas.

Geometry. A scene has a background *canvas* ``[Hc, Wc, 3]`` (extended to the whole plane by
reflection) and objects, each a premultiplied RGBA *sprite* ``[S, S, 4]``. Every surface k has
a 3x3 affine ``A_k(t)`` from its own pixel coordinates to frame pixels (pixel centres at
integer coordinates, as ``cv2.warpAffine``): the camera ``A_0(t) = C(t)`` for the canvas and
``A_k(t) = C(t) M_k(t)`` for object k, where ``M_k(t)`` places the sprite on the canvas
(translation + rotation + scale). Objects are composited back to front, so instance ``k``
(1-based) occludes instances ``< k``.

Ground-truth flow ``t -> t+g`` at frame pixel ``p`` on surface ``k`` (the top-most at p in
frame t) is ``A_k(t+g) A_k(t)^-1 p - p``: exact, since every surface is rigidly attached to
its own affine frame and brightness is constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MAIN, ACCENT, DARK = 1, 2, 3  # sprite part labels: class texture, class accent colour, dark rubber/shadow
DARK_RGB = (28, 28, 32)
SYMMETRIC = {"bottle", "diningtable", "pottedplant", "sofa", "tvmonitor"}  # no Left/Right pose


@dataclass(frozen=True)
class Style:
    """A class's colour statistics: base/second/accent RGB, pattern kind and scale (px), colour jitter std."""

    base: tuple
    second: tuple
    accent: tuple
    pattern: str
    scale: float
    jitter: float = 18.0


STYLES = {
    "aeroplane": Style((205, 208, 216), (50, 75, 160), (200, 40, 40), "stripes", 14),
    "bicycle": Style((180, 35, 40), (230, 200, 40), (40, 40, 45), "stripes", 5, 40),
    "bird": Style((125, 90, 55), (235, 220, 195), (235, 150, 30), "spots", 5),
    "boat": Style((240, 240, 236), (25, 65, 140), (245, 240, 225), "bands", 9),
    "bottle": Style((35, 115, 55), (200, 225, 210), (210, 30, 30), "metal", 0, 30),
    "bus": Style((232, 190, 35), (210, 70, 30), (45, 55, 75), "bands", 16, 25),
    "car": Style((180, 25, 35), (240, 240, 240), (60, 80, 100), "metal", 0, 70),
    "cat": Style((160, 150, 140), (55, 50, 45), (230, 170, 170), "stripes", 6),
    "chair": Style((125, 78, 42), (80, 45, 20), (125, 78, 42), "grain", 7),
    "cow": Style((236, 234, 228), (22, 20, 20), (230, 170, 170), "spots", 16, 10),
    "diningtable": Style((155, 102, 58), (105, 62, 30), (155, 102, 58), "grain", 13),
    "dog": Style((172, 122, 72), (95, 62, 35), (60, 40, 25), "noise", 9, 30),
    "horse": Style((112, 62, 30), (62, 32, 15), (30, 20, 15), "noise", 20),
    "motorbike": Style((25, 25, 30), (200, 200, 212), (190, 190, 200), "metal", 0, 25),
    "person": Style((60, 80, 150), (35, 40, 60), (220, 180, 150), "checker", 6, 45),
    "pottedplant": Style((45, 130, 45), (18, 70, 22), (172, 82, 42), "spots", 4),
    "sheep": Style((236, 230, 214), (190, 184, 168), (40, 36, 34), "fluffy", 3, 10),
    "sofa": Style((132, 40, 52), (92, 25, 35), (60, 40, 30), "checker", 5, 35),
    "train": Style((40, 90, 162), (222, 222, 222), (30, 35, 45), "bands", 12, 25),
    "tvmonitor": Style((32, 32, 36), (70, 70, 78), (70, 130, 205), "metal", 0, 8),
}


# ---------------------------------------------------------------------------------------------
# Shapes: each class draws primitives in a box [-1, 1]^2 (x right, y down, facing right).
# A primitive is (part, kind, *params) with kind poly(points) | ellipse(centre, axes, deg) |
# disc(centre, r) | ring(centre, r, width) | line(points, width).


def _j(rng, value, rel=0.12):
    """``value * U(1 - rel, 1 + rel)``: per-instance geometric jitter."""
    return value * rng.uniform(1 - rel, 1 + rel)


def _rect(part, x0, y0, x1, y1):
    return (part, "poly", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _legs(rng, xs, top, bottom, width, part=MAIN):
    return [(part, "line", [(x, top), (x + rng.uniform(-0.08, 0.08), bottom)], width) for x in xs]


def _aeroplane(rng):
    w, s = _j(rng, 0.75), _j(rng, 0.3)
    return [(MAIN, "ellipse", (0, 0), (0.95, _j(rng, 0.12)), 0),
            (MAIN, "poly", [(0.2, -0.06), (0.2 - s, -w), (-s, -w), (-0.1, 0), (-s, w), (0.2 - s, w), (0.2, 0.06)]),
            (MAIN, "poly", [(-0.7, 0), (-0.92, -0.32), (-1, -0.32), (-0.88, 0), (-1, 0.32), (-0.92, 0.32)]),
            (ACCENT, "ellipse", (0.78, 0), (0.1, 0.06), 0)]


def _bicycle(rng):
    r = _j(rng, 0.36)
    back, front, seat, bar = (-0.58, 0.35), (0.58, 0.35), (-0.18, -0.3), (0.42, -0.38)
    return [(DARK, "ring", back, r, 0.08), (DARK, "ring", front, r, 0.08),
            (MAIN, "line", [back, seat, (0.05, 0.35), back], 0.06),
            (MAIN, "line", [(0.05, 0.35), bar, front], 0.06),
            (MAIN, "line", [seat, bar], 0.06),
            (DARK, "line", [(-0.3, -0.34), (-0.05, -0.34)], 0.07),
            (DARK, "line", [bar, (0.55, -0.55)], 0.06)]


def _bird(rng):
    h = _j(rng, 0.22)
    return [(MAIN, "ellipse", (-0.05, 0.05), (_j(rng, 0.6), _j(rng, 0.32)), rng.uniform(-15, 15)),
            (MAIN, "poly", [(-0.5, -0.02), (-1, -0.3), (-0.95, 0.25)]),
            (MAIN, "disc", (0.55, -0.25), h),
            (ACCENT, "poly", [(0.5 + h, -0.32), (0.98, -0.22), (0.5 + h, -0.16)]),
            (ACCENT, "line", [(-0.1, 0.35), (-0.15, 0.75)], 0.04), (ACCENT, "line", [(0.1, 0.35), (0.12, 0.75)], 0.04)]


def _boat(rng):
    top = -_j(rng, 0.85)
    return [(MAIN, "poly", [(-1, 0.25), (1, 0.25), (0.72, 0.62), (-0.72, 0.62)]),
            (DARK, "line", [(0, 0.25), (0, top)], 0.04),
            (ACCENT, "poly", [(0.06, top), (0.06, 0.18), (_j(rng, 0.7), 0.18)]),
            (ACCENT, "poly", [(-0.06, top + 0.15), (-0.06, 0.18), (-_j(rng, 0.45), 0.18)])]


def _bottle(rng):
    w, n = _j(rng, 0.28), _j(rng, 0.1)
    return [_rect(MAIN, -w, -0.2, w, 1), (MAIN, "poly", [(-w, -0.2), (-n, -0.55), (n, -0.55), (w, -0.2)]),
            _rect(MAIN, -n, -0.9, n, -0.5), _rect(ACCENT, -n * 1.1, -1, n * 1.1, -0.86),
            _rect(ACCENT, -w, _j(rng, 0.15), w, 0.5)]


def _bus(rng):
    h = _j(rng, 0.42)
    windows = [_rect(ACCENT, x, -h + 0.1, x + 0.24, -0.05) for x in np.arange(-0.88, 0.7, 0.3)]
    return [(MAIN, "poly", [(-1, -h + 0.05), (-0.95, -h), (0.95, -h), (1, -h + 0.05), (1, 0.35), (-1, 0.35)]),
            *windows, _rect(ACCENT, 0.72, -h + 0.1, 0.94, 0.25),
            (DARK, "disc", (-0.62, 0.38), 0.15), (DARK, "disc", (0.58, 0.38), 0.15)]


def _car(rng):
    c = _j(rng, 0.42)
    return [(MAIN, "poly", [(-1, 0.0), (-0.95, -0.08), (0.95, -0.08), (1, 0.02), (1, 0.3), (-1, 0.3)]),
            (MAIN, "poly", [(-0.6, -0.05), (-0.38, -c), (0.3, -c), (0.62, -0.05)]),
            (ACCENT, "poly", [(-0.5, -0.1), (-0.33, -c + 0.07), (0.25, -c + 0.07), (0.5, -0.1)]),
            (DARK, "disc", (-0.6, 0.3), _j(rng, 0.19)), (DARK, "disc", (0.6, 0.3), _j(rng, 0.19))]


def _cat(rng):
    hr = _j(rng, 0.25)
    return [(MAIN, "ellipse", (-0.15, 0.2), (_j(rng, 0.5), _j(rng, 0.26)), 0),
            *_legs(rng, (-0.5, -0.35, 0.05, 0.2), 0.3, 0.72, 0.09),
            (MAIN, "line", [(-0.6, 0.15), (-0.85, -0.1), (-0.8, -0.5)], 0.07),
            (MAIN, "disc", (0.5, -0.12), hr),
            (MAIN, "poly", [(0.3, -0.2), (0.32, -0.2 - 2.2 * hr), (0.5, -0.12 - hr)]),
            (MAIN, "poly", [(0.5, -0.12 - hr), (0.7, -0.2 - 2.2 * hr), (0.72, -0.2)]),
            (ACCENT, "disc", (0.5 + 0.8 * hr, -0.05), 0.05)]


def _chair(rng):
    seat, back = _j(rng, 0.1), _j(rng, 0.95)
    return [_rect(MAIN, -0.5, seat - 0.08, 0.55, seat + 0.08), _rect(MAIN, -0.55, -back, -0.38, seat),
            _rect(MAIN, -0.55, -back, -0.3, -back + 0.12),
            *_legs(rng, (-0.46, 0.46), seat, 1, 0.08)]


def _cow(rng):
    h = _j(rng, 0.3)
    return [(MAIN, "poly", [(-0.75, -h), (0.45, -h - 0.05), (0.55, h - 0.05), (-0.75, h)]),
            (MAIN, "ellipse", (-0.75, 0), (0.12, h), 0),
            *_legs(rng, (-0.65, -0.45, 0.25, 0.42), h - 0.05, 0.9, 0.12),
            (MAIN, "poly", [(0.45, -h), (0.75, -h - 0.25), (0.98, -0.05), (0.55, 0.02)]),
            (ACCENT, "ellipse", (0.9, -0.05), (0.1, 0.08), 30),
            (DARK, "line", [(-0.85, -0.1), (-0.95, 0.45)], 0.04)]


def _diningtable(rng):
    top = -_j(rng, 0.35)
    return [_rect(MAIN, -1, top, 1, top + 0.13), _rect(MAIN, -0.9, top + 0.13, 0.9, top + 0.24),
            *_legs(rng, (-0.85, 0.85), top + 0.13, _j(rng, 0.65), 0.08),
            *_legs(rng, (-0.55, 0.55), top + 0.13, _j(rng, 0.45), 0.06)]


def _dog(rng):
    return [(MAIN, "ellipse", (-0.05, 0.05), (_j(rng, 0.5), _j(rng, 0.22)), 0),
            *_legs(rng, (-0.45, -0.3, 0.25, 0.38), 0.15, _j(rng, 0.72), 0.1),
            (MAIN, "line", [(0.38, -0.05), (0.55, -0.35)], 0.18),
            (MAIN, "ellipse", (0.65, -0.42), (0.2, 0.14), 15),
            (MAIN, "ellipse", (0.88, -0.36), (0.12, 0.07), 10),
            (ACCENT, "ellipse", (0.55, -0.32), (0.07, 0.16), -20),
            (MAIN, "line", [(-0.52, -0.05), (-0.75, _j(rng, -0.45))], 0.06)]


def _horse(rng):
    return [(MAIN, "ellipse", (-0.1, -0.05), (_j(rng, 0.52), 0.22), 0),
            *_legs(rng, (-0.48, -0.33, 0.2, 0.32), 0.1, 0.98, 0.08),
            (MAIN, "poly", [(0.22, -0.22), (0.55, -0.78), (0.72, -0.7), (0.45, 0.05)]),
            (MAIN, "ellipse", (0.75, -0.6), (0.24, 0.1), _j(rng, 35)),
            (ACCENT, "line", [(0.5, -0.8), (0.25, -0.3)], 0.07),
            (ACCENT, "line", [(-0.6, -0.1), (-0.8, 0.25), (-0.78, 0.5)], 0.08)]


def _motorbike(rng):
    r = _j(rng, 0.3)
    return [(DARK, "disc", (-0.62, 0.38), r), (DARK, "disc", (0.62, 0.38), r),
            (ACCENT, "disc", (-0.62, 0.38), r * 0.4), (ACCENT, "disc", (0.62, 0.38), r * 0.4),
            (MAIN, "poly", [(-0.6, 0.15), (-0.2, -0.2), (0.35, -0.22), (0.5, 0.1), (0.0, 0.35)]),
            (DARK, "line", [(-0.5, -0.2), (0.0, -0.25)], 0.09),
            (ACCENT, "line", [(0.62, 0.38), (0.4, -0.45), (0.25, -0.52)], 0.05)]


def _person(rng):
    sw, arm = _j(rng, 0.25), rng.uniform(-0.3, 0.3)
    return [_rect(MAIN, -sw, -0.58, sw, 0.15),
            (DARK, "line", [(-0.12, 0.12), (-0.16 + rng.uniform(-0.1, 0.05), 1)], 0.14),
            (DARK, "line", [(0.12, 0.12), (0.16 + rng.uniform(-0.05, 0.1), 1)], 0.14),
            (MAIN, "line", [(-sw, -0.52), (-sw - 0.12 + arm, 0.1)], 0.1),
            (MAIN, "line", [(sw, -0.52), (sw + 0.12 + arm, 0.1)], 0.1),
            (ACCENT, "disc", (0.0, -0.78), _j(rng, 0.17))]


def _pottedplant(rng):
    leaves = [(MAIN, "ellipse", (rng.uniform(-0.45, 0.45), rng.uniform(-0.75, 0.1)),
               (rng.uniform(0.12, 0.3), rng.uniform(0.06, 0.14)), rng.uniform(0, 180)) for _ in range(rng.integers(7, 12))]
    w = _j(rng, 0.35)
    return [*leaves, (MAIN, "line", [(0, 0.4), (0, -0.4)], 0.05),
            (ACCENT, "poly", [(-w, 0.38), (w, 0.38), (w * 0.72, 1), (-w * 0.72, 1)])]


def _sheep(rng):
    puffs = [(MAIN, "disc", (rng.uniform(-0.6, 0.45), rng.uniform(-0.22, 0.2)), rng.uniform(0.18, 0.3))
             for _ in range(rng.integers(8, 12))]
    return [*_legs(rng, (-0.45, -0.25, 0.15, 0.32), 0.1, _j(rng, 0.65), 0.08, DARK), *puffs, (MAIN, "disc", (0.35, -0.05), 0.25),
            (ACCENT, "ellipse", (0.62, -0.12), (0.2, 0.13), 20)]


def _sofa(rng):
    back = -_j(rng, 0.45)
    return [_rect(MAIN, -0.98, 0, 0.98, 0.45), _rect(MAIN, -0.88, back, 0.88, 0.05),
            _rect(MAIN, -1, back * 0.45, -0.76, 0.45), _rect(MAIN, 0.76, back * 0.45, 1, 0.45),
            _rect(ACCENT, -0.9, 0.45, -0.8, 0.58), _rect(ACCENT, 0.8, 0.45, 0.9, 0.58)]


def _train(rng):
    h = _j(rng, 0.25)
    wheels = [(DARK, "disc", (x, 0.22), 0.07) for x in np.linspace(-0.85, 0.6, 6)]
    return [(MAIN, "poly", [(-1, -h), (0.75, -h), (1, 0.0), (1, 0.2), (-1, 0.2)]),
            *[_rect(ACCENT, x, -h + 0.08, x + 0.14, -0.04) for x in np.arange(-0.92, 0.5, 0.22)],
            (ACCENT, "poly", [(0.72, -h + 0.06), (0.8, -h + 0.06), (0.94, -0.04), (0.72, -0.04)]), *wheels]


def _tvmonitor(rng):
    w, h = _j(rng, 0.85), _j(rng, 0.62)
    return [_rect(MAIN, -w, -h, w, h * 0.7), _rect(ACCENT, -w + 0.08, -h + 0.08, w - 0.08, h * 0.7 - 0.08),
            _rect(MAIN, -0.08, h * 0.7, 0.08, h * 0.7 + 0.2), _rect(MAIN, -0.4, h * 0.7 + 0.18, 0.4, h * 0.7 + 0.28)]


SHAPES = {name: globals()[f"_{name}"] for name in CLASSES}


def rasterise(primitives, size: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Primitives in ``[-1, 1]^2`` -> (part labels ``[S, S]`` uint8, alpha ``[S, S]`` float32), S = size.

    Drawn at 4x with sub-pixel precision; alpha is the area-averaged coverage.
    """
    ss, shift = 4, 4
    big = np.zeros((size * ss, size * ss), np.uint8)
    half = (size - 4) / 2  # 2 px margin so warped edges fade to transparent

    def px(point):
        x, y = point
        fixed = ss * 2**shift
        return int(round(((-x if flip else x) * half + size / 2) * fixed)), int(round((y * half + size / 2) * fixed))

    def length(value):
        return max(1, int(round(value * half * ss)))

    for part, kind, *params in primitives:
        if kind == "poly":
            cv2.fillPoly(big, [np.array([px(p) for p in params[0]], np.int32)], part, cv2.LINE_8, shift)
        elif kind == "ellipse":
            (centre, axes, angle), scale = params, half * ss * 2**shift
            axes = (int(axes[0] * scale), int(axes[1] * scale))
            cv2.ellipse(big, px(centre), axes, -angle if flip else angle, 0, 360, part, -1, cv2.LINE_8, shift)
        elif kind == "disc":
            cv2.circle(big, px(params[0]), int(params[1] * half * ss * 2**shift), part, -1, cv2.LINE_8, shift)
        elif kind == "ring":
            centre, radius, width = params
            cv2.circle(big, px(centre), int((radius - width / 2) * half * ss * 2**shift), part, length(width), cv2.LINE_8, shift)
        elif kind == "line":
            points, width = params
            cv2.polylines(big, [np.array([px(p) for p in points], np.int32)], False, part, length(width), cv2.LINE_8, shift)
        else:
            raise ValueError(f"unknown primitive {kind!r}")
    alpha = cv2.resize((big > 0).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return big[ss // 2 :: ss, ss // 2 :: ss], alpha


# ---------------------------------------------------------------------------------------------
# Textures


def fractal_noise(rng, height: int, width: int, scale: float, octaves: int = 3) -> np.ndarray:
    """Smooth value noise ``[H, W]`` float32 in [0, 1]: octaves of bicubic-upsampled uniform noise,
    the coarsest with feature size ``scale`` px, each next octave half the size and half the weight."""
    total = np.zeros((height, width), np.float32)
    for octave in range(octaves):
        step = max(scale / 2**octave, 1.0)
        grid = rng.random((int(height / step) + 3, int(width / step) + 3), dtype=np.float32)
        up = cv2.resize(grid, (int(grid.shape[1] * step), int(grid.shape[0] * step)), interpolation=cv2.INTER_CUBIC)
        total += up[:height, :width] / 2**octave
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-6)


def pattern(rng, kind: str, height: int, width: int, scale: float) -> np.ndarray:
    """A pattern ``[H, W]`` in [0, 1] mixing a style's base (0) and second (1) colours."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        phase = 2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / scale + 3 * fractal_noise(rng, height, width, 3 * scale, 1)
        return np.clip(2.5 * np.sin(phase) + 0.5, 0, 1)
    if kind == "bands":  # horizontal bands in sprite coordinates
        return (np.sin(2 * np.pi * y / (scale * rng.uniform(1.5, 3))) > rng.uniform(0.3, 0.8)).astype(np.float32)
    if kind == "spots":
        return np.clip((fractal_noise(rng, height, width, scale, 2) - rng.uniform(0.5, 0.62)) * 8 + 0.5, 0, 1)
    if kind == "grain":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (y + 10 * fractal_noise(rng, height, width, 4 * scale, 2)) / scale)
    if kind == "checker":
        return ((np.sin(np.pi * x / scale) * np.sin(np.pi * y / scale)) > 0).astype(np.float32) * 0.8
    if kind == "noise":
        return fractal_noise(rng, height, width, scale)
    if kind == "fluffy":
        return np.abs(np.sin(12 * fractal_noise(rng, height, width, scale, 2)))
    if kind == "metal":  # a smooth gradient with a specular band
        band = rng.uniform(0.2, 0.5) * height
        return np.exp(-(((y - band) / (0.12 * height)) ** 2)) * 0.8
    raise ValueError(f"unknown pattern {kind!r}")


def jitter_colour(rng, rgb, std: float) -> np.ndarray:
    """``rgb + N(0, std^2)`` per channel, times a brightness factor U(0.85, 1.15)."""
    return np.clip((np.asarray(rgb, np.float32) + rng.normal(0, std, 3)) * rng.uniform(0.85, 1.15), 0, 255)


def mix(colour_a, colour_b, weight: np.ndarray) -> np.ndarray:
    """``a (1 - w) + b w`` per pixel: colours ``[3]``, weight ``[H, W]`` -> ``[H, W, 3]`` float32."""
    colour_a, colour_b = np.asarray(colour_a, np.float32), np.asarray(colour_b, np.float32)
    return colour_a + (colour_b - colour_a) * weight.astype(np.float32)[..., None]


def shade(rng, image: np.ndarray, scale: float, grain: float) -> np.ndarray:
    """``image * light + grain * (n - 0.5)``: low-frequency shading and a fine 2 px noise n that
    gives flow estimators texture everywhere."""
    height, width = image.shape[:2]
    light = 0.82 + 0.36 * fractal_noise(rng, height, width, scale, 2)
    fine = (fractal_noise(rng, height, width, 2.0, 1) - 0.5) * grain
    return image * light[..., None] + fine[..., None]


def make_sprite(rng, label: int, size: int, flip: bool) -> np.ndarray:
    """One object instance of class ``label``: premultiplied RGBA ``[S, S, 4]`` float32, S = size.

    Main parts: the class pattern between its two jittered colours; accent and dark parts:
    their colour modulated by smooth noise; everything shaded and grained.
    """
    style = STYLES[CLASSES[label]]
    part, alpha = rasterise(SHAPES[CLASSES[label]](rng), size, flip)
    base, second = jitter_colour(rng, style.base, style.jitter), jitter_colour(rng, style.second, style.jitter)
    accent = jitter_colour(rng, style.accent, 15)
    rgb = mix(base, second, pattern(rng, style.pattern, size, size, style.scale * rng.uniform(0.8, 1.25)))
    detail = 0.75 + 0.5 * fractal_noise(rng, size, size, 5, 2)[..., None]
    rgb = np.where((part == ACCENT)[..., None], accent * detail, rgb)
    rgb = np.where((part == DARK)[..., None], jitter_colour(rng, DARK_RGB, 6) * (2 * detail - 0.5), rgb)
    rgb = np.clip(shade(rng, rgb, size / 2, 24), 0, 255)
    return np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=-1).astype(np.float32)


def random_colour(rng) -> np.ndarray:
    """A background colour: any hue, low-to-mid saturation (HSV -> RGB float32)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(20, 150), rng.uniform(70, 230)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def make_background(rng, width: int, height: int) -> np.ndarray:
    """A canvas ``[H, W, 3]`` float32: a two-colour ground/sky split or pattern with 4-13 clutter
    blobs, laid out at half resolution (then upsampled), shaded and grained at full resolution."""
    low_w, low_h = (width + 1) // 2, (height + 1) // 2
    top, bottom = random_colour(rng), random_colour(rng)
    kind = str(rng.choice(["split", "grain", "noise", "stripes"]))
    if kind == "split":
        y = np.arange(low_h, dtype=np.float32)[:, None] / low_h
        weight = np.broadcast_to(1 / (1 + np.exp(-(y - rng.uniform(0.3, 0.7)) / rng.uniform(0.02, 0.12))), (low_h, low_w))
    else:
        weight = pattern(rng, kind, low_h, low_w, rng.uniform(6, 20))
    canvas = mix(top, bottom, weight)
    clutter = np.zeros((low_h, low_w), np.uint8)
    colours = [random_colour(rng) for _ in range(rng.integers(4, 14))]
    for index in range(len(colours)):
        centre = (int(rng.uniform(0, low_w)), int(rng.uniform(0, low_h)))
        axes = (int(rng.uniform(0.03, 0.2) * low_w) + 1, int(rng.uniform(0.03, 0.2) * low_h) + 1)
        if rng.random() < 0.5:
            cv2.ellipse(clutter, centre, axes, rng.uniform(0, 180), 0, 360, index + 1, -1)
        else:
            corner = (centre[0] - axes[0], centre[1] - axes[1])
            cv2.rectangle(clutter, corner, (centre[0] + axes[0], centre[1] + axes[1]), index + 1, -1)
    palette = np.array([[0, 0, 0], *colours], np.float32)
    canvas = np.where((clutter > 0)[..., None], palette[clutter], canvas)
    canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(shade(rng, canvas, rng.uniform(20, 60), rng.uniform(20, 36)), 0, 255).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Motion and scenes


def affine(translate, angle, scale_x, scale_y, origin) -> np.ndarray:
    """``[T, 3, 3]`` maps ``u -> translate + R(angle) diag(sx, sy) (u - origin)``; args broadcast over T."""
    translate = np.asarray(translate, np.float64).reshape(-1, 2)
    angle, scale_x, scale_y = (np.asarray(a, np.float64).reshape(-1) for a in (angle, scale_x, scale_y))
    count = max(len(translate), len(angle), len(scale_x), len(scale_y))
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.zeros((count, 2, 2))
    linear[:, 0, 0], linear[:, 0, 1] = cos * scale_x, -sin * scale_y
    linear[:, 1, 0], linear[:, 1, 1] = sin * scale_x, cos * scale_y
    out = np.zeros((count, 3, 3))
    out[:, :2, :2] = linear
    out[:, :2, 2] = translate - linear @ np.asarray(origin, np.float64)
    out[:, 2, 2] = 1
    return out


def wobble(rng, times: np.ndarray, amplitude: float, max_speed: float) -> np.ndarray:
    """``a sin(w t + phi)`` with ``a = amplitude``, ``a w <= max_speed``: smooth and bounded for any T."""
    omega = min(rng.uniform(0.05, 0.3), max_speed / max(amplitude, 1e-6))
    return amplitude * np.sin(omega * times + rng.uniform(0, 2 * np.pi))


def sample_camera(rng, num_frames: int, size, canvas_size, still: bool = False) -> np.ndarray:
    """Camera ``C(t)`` ``[T, 3, 3]`` canvas -> frame: smooth pan (<= 0.75 px/frame), zoom (+-10 %), roll (+-3 deg).

    The speeds are a quarter of the first world's (pan <= 2.5 px/frame), which moved far more than real video
    (median 7.3 px against 0.9 px between frames 5 apart: benchmarks/results/flow_statistics.md). A single
    still (T = 1) does not depend on them."""
    (width, height), (canvas_w, canvas_h) = size, canvas_size
    t = np.arange(num_frames, dtype=np.float64)
    amp = 0 if still else 1
    centre = np.stack([canvas_w / 2 + wobble(rng, t, amp * rng.uniform(0, 0.25) * width, 0.6),
                       canvas_h / 2 + wobble(rng, t, amp * rng.uniform(0, 0.25) * height, 0.45)], axis=1)
    zoom = rng.uniform(0.95, 1.15) * np.exp(wobble(rng, t, amp * rng.uniform(0, 0.1), 0.003))
    roll = rng.uniform(-0.03, 0.03) + wobble(rng, t, amp * rng.uniform(0, 0.05), 0.0015)
    to_centre = affine(((width - 1) / 2, (height - 1) / 2), roll, zoom, zoom, (0, 0))
    return to_centre @ affine(-centre, 0, 1, 1, (0, 0))


@dataclass
class SceneObject:
    """One object: class index, sprite (premultiplied RGBA ``[S, S, 4]``), ``motion`` ``[T, 3, 3]`` sprite -> canvas."""

    label: int
    sprite: np.ndarray
    motion: np.ndarray
    static: bool
    pose: str  # VOC pose: Left, Right or Unspecified


@dataclass
class Scene:
    """A canvas under a camera ``[T, 3, 3]`` (canvas -> frame) with objects back to front; size = (W, H)."""

    canvas: np.ndarray
    camera: np.ndarray
    objects: list
    size: tuple

    def surfaces(self) -> np.ndarray:
        """``A_k(t)`` ``[K+1, T, 3, 3]``: surface pixels -> frame pixels, k = 0 the canvas."""
        return np.stack([self.camera] + [self.camera @ obj.motion for obj in self.objects])


def sample_object(rng, label: int, times: np.ndarray, size: float, anchor, camera0, static: bool,
                  speeds: tuple[float, float] = (0.12, 1.0)) -> SceneObject:
    """An object of ``size`` px whose centre is at frame point ``anchor`` at t=0; its motion
    (unless ``static``, i.e. fixed on the canvas) is drift at ``U(speeds)`` px/frame + wobble
    (<= 0.4 max(speeds) px/frame), rotation and scale oscillations."""
    pixels = int(np.ceil(size)) + 4
    flip = CLASSES[label] not in SYMMETRIC and rng.random() < 0.5
    pose = "Unspecified" if CLASSES[label] in SYMMETRIC else ("Left" if flip else "Right")
    sprite = make_sprite(rng, label, pixels, flip)
    start = (np.linalg.inv(camera0) @ np.array([anchor[0], anchor[1], 1.0]))[:2]
    aspect = rng.uniform(0.88, 1.12)
    angle0 = rng.uniform(-0.3, 0.3)
    if static:
        centre, angle, scale = np.broadcast_to(start, (len(times), 2)), np.full(len(times), angle0), 1.0
    else:
        speed, heading = rng.uniform(*speeds), rng.uniform(0, 2 * np.pi)
        drift = np.outer(times, [np.cos(heading), np.sin(heading)]) * speed
        centre = start + drift + np.stack([wobble(rng, times, rng.uniform(0, 5), 0.4 * speeds[1]) for _ in range(2)], axis=1)
        angle = angle0 + wobble(rng, times, rng.uniform(0, 0.3), 0.025)
        scale = np.exp(wobble(rng, times, rng.uniform(0, 0.15), 0.01))
    origin = ((pixels - 1) / 2, (pixels - 1) / 2)
    motion = affine(centre, angle, scale * aspect, scale / aspect, origin)
    return SceneObject(label, sprite, motion, static, pose)


WORLDS = ("default", "one-object")


def sample_clip_scene(rng, num_frames: int, size, world: str = "default") -> Scene:
    """A clip's scene: canvas twice the frame, camera (still half the time), 2-5 objects of random classes,
    each static relative to the canvas with probability 0.2, the others drifting at up to 1 px/frame.

    The first world (camera still 15 %, 1-4 objects, static 30 %, up to 2.5 px/frame) moved far more than real
    video and less of it independently; these settings follow the real clips' statistics
    (benchmarks/results/flow_statistics.md, frames 5 apart: median 0.87 px real, 7.30 first world, 1.66 now;
    pixels moving apart from the dominant motion, by DIS: 24.5 % real, 18.4 % first world, 19.4 % now).

    ``world="one-object"``: the simplest case the method must solve, one moving object of a random
    class (up to 2.5 px/frame) over a still camera and background (a diagnostic world: flow separates
    exactly object and background)."""
    if world not in WORLDS:
        raise ValueError(f"unknown synthetic world {world!r}; choose from {WORLDS}")
    one_object = world == "one-object"
    width, height = size
    canvas = make_background(rng, 2 * width, 2 * height)
    camera = sample_camera(rng, num_frames, size, (2 * width, 2 * height), still=one_object or rng.random() < 0.5)
    times = np.arange(num_frames, dtype=np.float64)
    objects = [
        sample_object(rng, int(rng.integers(len(CLASSES))), times, rng.uniform(0.3, 0.6) * height,
                      (rng.uniform(0.15, 0.85) * width, rng.uniform(0.2, 0.8) * height), camera[0],
                      not one_object and rng.random() < 0.2, speeds=(0.3, 2.5) if one_object else (0.12, 1.0))
        for _ in range(1 if one_object else rng.integers(2, 6))
    ]
    return Scene(canvas, camera, objects, tuple(size))


def sample_still_scene(rng, size, labels, centred: bool = False) -> Scene:
    """One still: objects of classes ``labels`` anywhere (sizes 8-80 % of the short side, so some
    are small or cut by the border), or one ``centred`` object filling 45-85 %."""
    width, height = size
    canvas_size = (int(1.15 * width), int(1.15 * height))
    camera = sample_camera(rng, 1, size, canvas_size)
    short, times = min(width, height), np.zeros(1)
    objects = []
    for label in labels:
        if centred:
            extent = rng.uniform(0.45, 0.85) * short
            anchor = (width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6))
        else:
            extent = (rng.uniform(0.08, 0.2) if rng.random() < 0.15 else rng.uniform(0.25, 0.8)) * short
            anchor = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
        objects.append(sample_object(rng, int(label), times, extent, anchor, camera[0], True))
    return Scene(make_background(rng, *canvas_size), camera, objects, tuple(size))


def warp_sprite(sprite: np.ndarray, transform: np.ndarray, width: int, height: int):
    """Warp a sprite into the frame's region it covers: ``(x0, y0, rgba [h, w, 4])`` or None if off-frame.

    Same pixels as warping into the whole frame: the affine is shifted by the region's corner.
    """
    side = sprite.shape[0] - 1
    corners = transform[:2] @ np.array([[0, side, 0, side], [0, 0, side, side], [1, 1, 1, 1]], np.float64)
    x0, y0 = np.maximum(np.floor(corners.min(axis=1)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=1)).astype(int) + 2, (width, height))
    if x1 <= x0 or y1 <= y0:
        return None
    shifted = transform[:2] - np.array([[0, 0, x0], [0, 0, y0]], np.float64)
    rgba = cv2.warpAffine(sprite, shifted, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return int(x0), int(y0), rgba


def render_frame(scene: Scene, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame t -> (RGB ``[H, W, 3]`` uint8, instances ``[H, W]`` uint8: 0 background, k where
    object k is top-most with alpha > 0.5). Objects are composited back to front (premultiplied)."""
    width, height = scene.size
    frame = cv2.warpAffine(scene.canvas, scene.camera[t][:2], (width, height),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    instances = np.zeros((height, width), np.uint8)
    for index, obj in enumerate(scene.objects, start=1):
        warped = warp_sprite(obj.sprite, scene.camera[t] @ obj.motion[t], width, height)
        if warped is None:
            continue
        x0, y0, rgba = warped
        region = (slice(y0, y0 + rgba.shape[0]), slice(x0, x0 + rgba.shape[1]))
        frame[region] = frame[region] * (1 - rgba[..., 3:]) + rgba[..., :3]
        instances[region][rgba[..., 3] > 0.5] = index
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8), instances


def ground_truth_flow(surfaces: np.ndarray, instances: np.ndarray, t: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact flow ``t -> t+gap``: (flow ``[H, W, 2]`` float32, valid ``[H, W]`` bool).

    ``surfaces`` ``[K+1, T, 3, 3]`` (see :meth:`Scene.surfaces`), ``instances`` ``[T, H, W]``.
    ``flow(p) = A_k(t+gap) A_k(t)^-1 p - p`` with k the top-most surface at p in frame t; the
    value is exact everywhere. ``valid`` is False where that surface point leaves the frame or
    is hidden by another surface at t+gap (occluded), tested at the nearest pixel.
    """
    num_frames, height, width = instances.shape
    if not 0 <= t < t + gap < num_frames:
        raise ValueError(f"flow {t} -> {t + gap} is outside the clip's {num_frames} frames")
    relative = surfaces[:, t + gap] @ np.linalg.inv(surfaces[:, t])  # [K+1, 3, 3]
    label = instances[t]
    y, x = np.mgrid[:height, :width].astype(np.float64)
    matrix = relative[label]  # [H, W, 3, 3]
    qx = matrix[..., 0, 0] * x + matrix[..., 0, 1] * y + matrix[..., 0, 2]
    qy = matrix[..., 1, 0] * x + matrix[..., 1, 1] * y + matrix[..., 1, 2]
    flow = np.stack([qx - x, qy - y], axis=-1).astype(np.float32)
    ix, iy = np.rint(qx).astype(np.int64), np.rint(qy).astype(np.int64)
    inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    valid = inside & (instances[t + gap][np.clip(iy, 0, height - 1), np.clip(ix, 0, width - 1)] == label)
    return flow, valid


@dataclass(frozen=True)
class SyntheticClip:
    """A rendered clip: ``frames`` ``[T, H, W, 3]`` uint8 RGB, ``instances`` ``[T, H, W]`` uint8
    (0 background, k = object k; k occludes < k), ``classes[k-1]`` the class index (into
    :data:`CLASSES`) of object k, ``static[k-1]`` whether it is fixed to the background,
    ``surfaces`` ``[K+1, T, 3, 3]`` the affine of each surface (0 = background), ``gap`` the default flow gap."""

    frames: np.ndarray
    instances: np.ndarray
    classes: list
    static: list
    surfaces: np.ndarray
    gap: int

    def flow(self, t: int, gap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth flow ``t -> t+gap`` on the rendered frames: (``[H, W, 2]`` float32, valid ``[H, W]``)."""
        return ground_truth_flow(self.surfaces, self.instances, t, self.gap if gap is None else gap)


def render_clip(seed: int, num_frames: int = 24, size=(192, 144), gap: int = 5, world: str = "default") -> SyntheticClip:
    """Render the clip of ``seed`` (deterministic) in ``world`` (:data:`WORLDS`): ``size`` is (width, height)."""
    if num_frames < 1 or min(size) < 16 or gap < 1:
        raise ValueError(f"bad clip settings: num_frames={num_frames}, size={size}, gap={gap}")
    scene = sample_clip_scene(np.random.default_rng(seed), num_frames, size, world)
    frames, instances = zip(*(render_frame(scene, t) for t in range(num_frames)))
    return SyntheticClip(np.stack(frames), np.stack(instances), [o.label for o in scene.objects],
                         [o.static for o in scene.objects], scene.surfaces(), gap)
