"""Deterministic generator of synthetic cat, dog and wild animal faces.

Why it exists: the real AFHQ photos cannot be downloaded everywhere, so the
pipeline's default source draws faces instead. The task must be learnable but
not trivial, so the class is carried by *shape*, never by colour:

* cat  - tall narrow pointed ears, a round head, a short muzzle (two small
  pads, a small nose), long whiskers, big eyes with slit pupils.
* dog  - floppy ears hanging at the sides of the head (or half-up rounded
  ears with a folded tip), a long wide muzzle with a big dark nose and,
  sometimes, a tongue; dark round eyes.
* wild - big cats (short rounded ears, a wide muzzle with broad pads, ringed
  eyes with tear lines, often a mane) or wolves/foxes (large dark-tipped
  pointed ears set wide, a long narrow snout with the nose at its tip, cheek
  ruffs, narrow slanted eyes).

Single features overlap on purpose - pointed ears are shared by cats and
foxes, rounded ears by dogs and big cats, long muzzles by dogs and wolves, a
light muzzle and pink or light ear linings by everyone - so only the
combination decides the class. Everything else is shared by all classes with
different but overlapping frequencies: fur colour (one palette with per-image
jitter), pattern (solid, stripes, spots, patches), eye colour, nose colour and
background (solid, gradient or texture, sometimes in fur colours so the
silhouette does not stand out).

Pose varies a lot, vertically too (offset, scale, a small tilt), and lighting
varies (contrast, brightness, colour cast): a linear model on raw pixels can
then use little more than blurred class templates and stays near 60%, while a
small CNN, which finds a shape wherever it sits, learns the task. Images get a
soft focus and faint noise, like photos, so that a network trained with
rotation/zoom augmentation (which resamples, and so blurs) does not meet much
sharper images at validation time.

Drawing happens at twice the requested size and is reduced with a box filter,
a cheap form of anti-aliasing. Every random choice comes from one
``np.random.default_rng(seed)``, so an image depends only on its seed (about
2.5 ms for 128 px on one CPU core).

`draw_photo` makes the same faces at a photo's size (AFHQ: 512 px) for rehearsing a run at AFHQ's
scale: drawn at 128 px, enlarged and grained, so the files weigh and decode like AFHQ's JPEGs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

LABELS: tuple[str, ...] = ("cat", "dog", "wild")
IMAGE_SIZE: int = 128
# AFHQ's photos: 512x512 JPEG, quantised with the IJG tables of quality 75, 27 to 75 KB (median
# 43 KB) in the 57-photo sample; `draw_photo` images of that size land in the same range.
PHOTO_QUALITY: int = 75
# Grain strengths (standard deviations, in 8-bit levels); their spread gives AFHQ's spread of sizes.
GRAIN_SIGMAS: tuple[int, ...] = (5, 7, 9, 11)

RGB = tuple[int, int, int]
Point = tuple[float, float]

# One palette shared by every class; class frequencies below differ but overlap.
FUR_COLORS: dict[str, RGB] = {
    "orange": (215, 125, 50),
    "brown": (120, 75, 40),
    "grey": (135, 135, 140),
    "black": (42, 38, 38),
    "white": (235, 232, 225),
    "cream": (228, 208, 165),
    "tawny": (190, 148, 82),
}
EYE_COLORS: dict[str, RGB] = {
    "green": (95, 170, 80),
    "yellow": (225, 200, 60),
    "amber": (205, 135, 40),
    "brown": (105, 62, 30),
    "blue": (95, 150, 220),
}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "spots", "patches")
EAR_SHAPES: tuple[str, ...] = ("pointed", "rounded", "floppy")
MUZZLES: tuple[str, ...] = ("short", "wide", "long")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "texture")
SUBTYPES: tuple[str, ...] = ("cat", "dog", "bigcat", "wolf", "fox")

# Per-class frequencies (weights, normalised when drawn).
FUR_FREQ: dict[str, dict[str, float]] = {
    "cat": {"orange": 2, "grey": 2, "black": 1.5, "white": 1.5, "cream": 1.5, "brown": 1.5, "tawny": 1.5},
    "dog": {"brown": 2, "black": 1.5, "white": 1.5, "cream": 1.5, "tawny": 1.5, "grey": 1.5, "orange": 1.5},
    "wild": {"tawny": 2, "orange": 2, "grey": 2, "brown": 1.5, "cream": 1.5, "white": 1, "black": 1},
}
PATTERN_FREQ: dict[str, dict[str, float]] = {
    "cat": {"solid": 3, "stripes": 3, "spots": 1, "patches": 2.5},
    "dog": {"solid": 4, "patches": 4, "spots": 1, "stripes": 0.5},
    "wild": {"stripes": 4, "spots": 4, "solid": 1.5, "patches": 0.5},
}
EYE_FREQ: dict[str, dict[str, float]] = {
    "cat": {"green": 3, "yellow": 2.5, "amber": 2, "blue": 1.5, "brown": 1},
    "dog": {"brown": 4, "amber": 2.5, "blue": 1.5, "green": 1, "yellow": 1},
    "wild": {"amber": 3, "yellow": 3, "brown": 1.5, "green": 1.5, "blue": 1},
}

PINK: RGB = (225, 140, 150)
DARK: RGB = (30, 25, 25)


# ---------------------------------------------------------------- helpers
def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _clip(c: np.ndarray | tuple[float, ...]) -> RGB:
    r, g, b = (int(min(255, max(0, round(v)))) for v in c)
    return (r, g, b)


def _shade(c: RGB, f: float) -> RGB:
    return _clip(np.array(c, dtype=float) * f)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return _clip(np.array(a, dtype=float) * (1 - t) + np.array(b, dtype=float) * t)


def _jitter(rng: np.random.Generator, c: RGB, amount: float) -> RGB:
    # Per-image jitter: overall brightness plus per-channel tint.
    return _clip(np.array(c, dtype=float) * rng.uniform(0.85, 1.15) + rng.normal(0, amount, 3))


def _luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _edge(fur: RGB) -> RGB:
    # Outline colour: shapes read by their contour even on a fur-coloured background.
    return _shade(fur, 0.45) if _luma(fur) > 70 else _mix(fur, (170, 160, 150), 0.45)


def _stroke(r: float) -> int:
    return max(1, int(r * 0.07))


def _lobe(top: Point, length: float, width: float, angle: float, n: int = 18) -> list[Point]:
    """Ellipse hanging from `top`, its long axis tilted `angle` radians from straight down."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = width / 2 * np.cos(t)
    y = length / 2 * (1 + np.sin(t))
    ca, sa = math.cos(angle), math.sin(angle)
    return [(top[0] + xi * ca - yi * sa, top[1] + xi * sa + yi * ca) for xi, yi in zip(x, y, strict=True)]


def _on_head(cx: float, cy: float, rx: float, ry: float, deg: float, side: int) -> Point:
    """Point on the head ellipse at `deg` degrees from the top, on the left (-1) or right (+1)."""
    a = math.radians(deg)
    return (cx + side * rx * math.sin(a), cy - ry * math.cos(a))


def _circle(d: ImageDraw.ImageDraw, c: Point, r: float, fill: RGB | None, **kw: object) -> None:
    d.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill, **kw)


def _oval(d: ImageDraw.ImageDraw, c: Point, rx: float, ry: float, fill: RGB | None, **kw: object) -> None:
    d.ellipse((c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry), fill=fill, **kw)


# ---------------------------------------------------------------- background
def _background(rng: np.random.Generator, s: int) -> tuple[Image.Image, str]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    def colour() -> RGB:
        # Sometimes a fur colour, so the head outline is not always obvious.
        if rng.random() < 0.3:
            return _jitter(rng, list(FUR_COLORS.values())[int(rng.integers(len(FUR_COLORS)))], 12)
        # Otherwise a muted colour: a grey level plus a moderate tint, like real scenes.
        return _clip(rng.uniform(40, 220) + rng.normal(0, 30, 3))

    if kind == "solid":
        return Image.new("RGB", (s, s), colour()), kind
    if kind == "gradient":
        # Light falling across the scene: one colour fading into a related one.
        a = np.array(colour(), dtype=float)
        b = a + rng.normal(0, 35, 3)
        theta = rng.uniform(0, 2 * np.pi)
        grid = np.linspace(-0.5, 0.5, 8)
        t = np.clip(0.5 + np.cos(theta) * grid[None, :] + np.sin(theta) * grid[:, None], 0, 1)[..., None]
        small = np.clip(a * (1 - t) + b * t, 0, 255).astype(np.uint8)
        return Image.fromarray(small).resize((s, s), Image.BILINEAR), kind
    # Texture: a coarse random field of light and shade around one colour, smoothly upscaled.
    n = int(rng.integers(3, 9))
    base = np.array(colour(), dtype=float)
    field = base + rng.normal(0, rng.uniform(5, 15), (n, n, 1)) + rng.normal(0, 4, (n, n, 3))
    small = np.clip(field, 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((s, s), Image.BICUBIC), kind


# ---------------------------------------------------------------- face parts
def _ears_back(
    d: ImageDraw.ImageDraw, rng: np.random.Generator, sub: str, ear: str, head: tuple[float, float, float, float], fur: RGB
) -> None:
    """Ears that sit on top of the head outline, drawn before the head."""
    cx, cy, rx, ry = head
    r = (rx + ry) / 2
    # Inside of the ear: pink or light fur in every class (so pink ears do not mean "cat").
    if rng.random() < 0.5:
        inner = _mix(PINK, fur, rng.uniform(0, 0.3))
    else:
        inner = _mix(fur, (240, 236, 228), rng.uniform(0.4, 0.8))
    edge, w = _edge(fur), _stroke(r)
    if ear == "pointed":
        # Cats: tall and upright. Wolves/foxes: bigger and set wider apart.
        big = sub in ("wolf", "fox")
        deg = rng.uniform(42, 55) if big else rng.uniform(28, 42)
        half = rng.uniform(20, 26) if big else rng.uniform(13, 17)
        h = r * (rng.uniform(0.85, 1.1) if big else rng.uniform(0.8, 1.0))
        for side in (-1, 1):
            b0 = _on_head(cx, cy, rx * 0.95, ry * 0.95, deg - half, side)
            b1 = _on_head(cx, cy, rx * 0.95, ry * 0.95, deg + half, side)
            tilt = math.radians(deg * rng.uniform(0.4, 0.7))
            mid = ((b0[0] + b1[0]) / 2, (b0[1] + b1[1]) / 2)
            tip = (mid[0] + side * h * math.sin(tilt), mid[1] - h * math.cos(tilt))
            d.polygon([b0, tip, b1], fill=fur, outline=edge, width=w)
            d.polygon([_towards(b0, tip, 0.2), _towards(tip, mid, 0.25), _towards(b1, tip, 0.2), _towards(mid, tip, 0.05)], fill=inner)
            if big:
                d.polygon([tip, _towards(tip, b0, 0.4), _towards(tip, b1, 0.4)], fill=DARK)
    elif ear == "rounded":
        # Big cats: short round ears. Dogs: larger, with the tip folded forward.
        dog = sub == "dog"
        deg = rng.uniform(42, 55)
        er = r * (rng.uniform(0.3, 0.38) if dog else rng.uniform(0.2, 0.28))
        for side in (-1, 1):
            c = _on_head(cx, cy, rx, ry, deg, side)
            c = (c[0] + side * er * 0.2, c[1] - er * 0.3)
            _circle(d, c, er, fur, outline=edge, width=w)
            if dog:
                # Folded flap: a darker half-disc hanging over the lower part.
                flap = _shade(fur, rng.uniform(0.6, 0.8))
                d.pieslice((c[0] - er, c[1] - er * 0.6, c[0] + er, c[1] + er * 1.4), 0, 180, fill=flap)
            else:
                _circle(d, (c[0], c[1] + er * 0.15), er * 0.55, inner)


def _towards(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _ears_front(d: ImageDraw.ImageDraw, rng: np.random.Generator, head: tuple[float, float, float, float], fur: RGB) -> None:
    """Floppy dog ears: lobes hanging over the sides of the head."""
    cx, cy, rx, ry = head
    r = (rx + ry) / 2
    # Usually darker than the head, always outlined, so the ear reads as a separate lobe.
    colour = _shade(fur, rng.uniform(0.45, 0.85)) if rng.random() < 0.7 else _jitter(rng, fur, 10)
    deg = rng.uniform(55, 75)
    length, width = r * rng.uniform(1.2, 1.6), r * rng.uniform(0.45, 0.6)
    tilt = math.radians(rng.uniform(5, 30))
    for side in (-1, 1):
        top = _on_head(cx, cy, rx, ry, deg, side)
        d.polygon(_lobe(top, length, width, -side * tilt), fill=colour, outline=_edge(fur), width=_stroke(r))


def _mane(d: ImageDraw.ImageDraw, rng: np.random.Generator, head: tuple[float, float, float, float], fur: RGB) -> None:
    """Big-cat mane: a jagged ring behind the head."""
    cx, cy, rx, ry = head
    if rng.random() < 0.7:
        colour = _shade(fur, rng.uniform(0.5, 0.85))
    else:
        colour = _jitter(rng, FUR_COLORS["brown"], 15)
    n = int(rng.integers(14, 22))
    rad = (rx + ry) / 2 * rng.uniform(1.4, 1.7)
    pts = []
    for i in range(2 * n):
        a = math.pi * i / n
        rr = rad * (1.0 if i % 2 == 0 else rng.uniform(0.78, 0.9))
        pts.append((cx + rr * math.sin(a), cy + 0.1 * ry - rr * math.cos(a)))
    d.polygon(pts, fill=colour)


def _pattern(rng: np.random.Generator, s: int, pattern: str, head: tuple[float, float, float, float], fur: RGB) -> Image.Image | None:
    """Markings on their own layer; the caller masks them to the fur."""
    if pattern == "solid":
        return None
    cx, cy, rx, ry = head
    r = (rx + ry) / 2
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    # Dark fur gets light markings, otherwise they would be invisible.
    mark = _shade(fur, rng.uniform(0.55, 0.75)) if _luma(fur) > 90 else _mix(fur, (230, 220, 200), 0.3)
    if pattern == "stripes":
        w = max(2, int(r * rng.uniform(0.06, 0.11)))
        for _ in range(int(rng.integers(2, 5))):  # forehead: near-vertical
            x = cx + rng.uniform(-0.4, 0.4) * rx
            y0 = cy - ry * rng.uniform(0.9, 1.1)
            pts = [(x, y0), (x + rng.normal(0, 0.08) * r, y0 + 0.25 * r), (x + rng.normal(0, 0.1) * r, y0 + r * rng.uniform(0.4, 0.6))]
            d.line(pts, fill=mark, width=w, joint="curve")
        for side in (-1, 1):  # cheeks: near-horizontal, from the edge inwards
            for _ in range(int(rng.integers(2, 4))):
                y = cy + rng.uniform(-0.2, 0.5) * ry
                x0 = cx + side * rx * 1.05
                pts = [
                    (x0, y),
                    (x0 - side * 0.25 * r, y + rng.normal(0, 0.06) * r),
                    (x0 - side * r * rng.uniform(0.4, 0.55), y + rng.normal(0, 0.1) * r),
                ]
                d.line(pts, fill=mark, width=w, joint="curve")
    elif pattern == "spots":
        rosette = rng.random() < 0.4
        for _ in range(int(rng.integers(12, 26))):
            c = (cx + rng.uniform(-1.1, 1.1) * rx, cy + rng.uniform(-1.2, 0.9) * ry)
            sr = r * rng.uniform(0.05, 0.1)
            if rosette:
                _circle(d, c, sr * 1.3, None, outline=mark, width=max(1, int(sr * 0.5)))
            else:
                _circle(d, c, sr, mark)
    else:  # patches: a few big blobs of a contrasting colour
        if _luma(fur) < 180:
            other = (240, 236, 228)
        else:
            other = _jitter(rng, FUR_COLORS["brown" if rng.random() < 0.5 else "black"], 10)
        for _ in range(int(rng.integers(1, 4))):
            c = (cx + rng.uniform(-0.9, 0.9) * rx, cy + rng.uniform(-1.0, 0.7) * ry)
            _oval(d, c, r * rng.uniform(0.3, 0.6), r * rng.uniform(0.3, 0.6), other)
    return layer


def _eyes(d: ImageDraw.ImageDraw, rng: np.random.Generator, sub: str, head: tuple[float, float, float, float], iris: RGB) -> None:
    """Eye shape follows the animal (eye colour does not): cats big with slit pupils, dogs dark and
    round, big cats ringed with a dark tear line, wolves and foxes narrow and slanted."""
    cx, cy, rx, ry = head
    r = (rx + ry) / 2
    dx = rx * rng.uniform(0.32, 0.42)
    y = cy - ry * rng.uniform(0.02, 0.15)
    for side in (-1, 1):
        c = (cx + side * dx, y)
        if sub == "cat":
            er = r * rng.uniform(0.19, 0.23)
            _oval(d, c, er * 1.12, er, DARK)
            _oval(d, c, er, er * 0.88, iris)
            _oval(d, c, er * rng.uniform(0.15, 0.3), er * 0.85, DARK)  # slit pupil
        elif sub == "dog":
            er = r * rng.uniform(0.11, 0.14)
            _circle(d, c, er * 1.1, DARK)
            _circle(d, c, er * 0.95, _mix(iris, DARK, 0.3))
            _circle(d, c, er * 0.65, DARK)
        elif sub == "bigcat":
            er = r * rng.uniform(0.11, 0.14)
            ring = _mix(iris, (240, 236, 228), 0.7)
            _circle(d, c, er * 1.6, ring)
            # Tear line from the inner corner down towards the muzzle.
            d.line(
                [(c[0] - side * er * 0.8, c[1] + er * 0.6), (cx + side * r * 0.2, cy + ry * 0.4)], fill=DARK, width=max(1, int(r * 0.07))
            )
            _circle(d, c, er * 1.1, DARK)
            _circle(d, c, er, iris)
            _circle(d, c, er * 0.4, DARK)
        else:  # wolf, fox: narrow almond slanting up towards the ears
            er = r * rng.uniform(0.13, 0.16)
            slant = -side * math.radians(rng.uniform(15, 25))
            ca, sa = math.cos(slant), math.sin(slant)
            pts = [
                (
                    c[0] + er * (1.2 * math.cos(t) * ca - 0.5 * math.sin(t) * sa),
                    c[1] + er * (1.2 * math.cos(t) * sa + 0.5 * math.sin(t) * ca),
                )
                for t in np.linspace(0, 2 * np.pi, 14, endpoint=False)
            ]
            d.polygon(pts, fill=iris, outline=DARK, width=max(1, int(r * 0.04)))
            _circle(d, c, er * 0.3, DARK)
        _circle(d, (c[0] - r * 0.04, c[1] - r * 0.04), r * 0.03, (245, 245, 245))  # highlight


def _whiskers(d: ImageDraw.ImageDraw, rng: np.random.Generator, c: Point, r: float, spread: float, fur: RGB, weight: float) -> None:
    # Light on dark fur, dark on light fur: whiskers must survive downsizing to 64 px.
    colour = (240, 240, 235) if _luma(fur) < 140 else (35, 30, 30)
    w = max(1, int(r * weight))
    for side in (-1, 1):
        for k in range(3):
            start = (c[0] + side * 0.2 * r, c[1] + (k - 1) * 0.05 * r)
            end = (c[0] + side * r * rng.uniform(spread - 0.3, spread), c[1] + r * ((k - 1) * 0.22 + rng.normal(0, 0.05)))
            d.line([start, end], fill=colour, width=w)


def _muzzle(d: ImageDraw.ImageDraw, rng: np.random.Generator, sub: str, head: tuple[float, float, float, float], fur: RGB) -> None:
    """Muzzle, nose and mouth: their shape and place differ by animal, their colours do not."""
    cx, cy, rx, ry = head
    r = (rx + ry) / 2
    # Every class has a light muzzle, so "light lower face" says nothing about the class.
    light = _mix(fur, (240, 236, 228), rng.uniform(0.3, 0.8))
    nose_dark = _jitter(rng, DARK, 6)
    line_w = max(1, int(r * 0.03))
    if sub == "cat":  # short muzzle: two small pads, tiny nose, whiskers
        py = cy + ry * rng.uniform(0.35, 0.45)
        for side in (-1, 1):
            _circle(d, (cx + side * 0.15 * r, py), r * 0.18, light)
        ny = py - 0.14 * r
        nw = r * rng.uniform(0.07, 0.1)
        d.polygon(
            [(cx - nw, ny - nw * 0.6), (cx + nw, ny - nw * 0.6), (cx, ny + nw * 0.7)],
            fill=_mix(PINK, (110, 70, 60), rng.uniform(0, 0.5)) if rng.random() < 0.5 else nose_dark,
        )
        _whiskers(d, rng, (cx, py), r, 1.8, fur, 0.065)
    elif sub == "bigcat":  # wide muzzle: broad pads, broad nose, chin
        py = cy + ry * rng.uniform(0.38, 0.48)
        _oval(d, (cx, py + 0.25 * r), 0.22 * r, 0.16 * r, light)
        for side in (-1, 1):
            _oval(d, (cx + side * 0.24 * r, py), r * 0.3, r * 0.22, light)
        ny = py - 0.18 * r
        nw = r * rng.uniform(0.15, 0.2)
        nose = _mix(PINK, (110, 70, 60), rng.uniform(0.2, 1)) if rng.random() < 0.5 else nose_dark
        d.polygon([(cx - nw, ny - nw * 0.5), (cx + nw, ny - nw * 0.5), (cx, ny + nw * 0.8)], fill=nose)
        d.line([(cx, ny + nw * 0.8), (cx, py + 0.1 * r)], fill=DARK, width=line_w)
        for side in (-1, 1):  # whisker dots
            for k in range(3):
                _circle(d, (cx + side * (0.17 + 0.09 * k) * r, py - 0.03 * r + 0.04 * k * r), r * 0.02, DARK)
        if rng.random() < 0.3:
            _whiskers(d, rng, (cx, py), r, 1.2, fur, 0.025)
    elif sub == "dog":  # long, wide muzzle reaching below the head, big dark nose
        mw, mh = r * rng.uniform(0.4, 0.52), r * rng.uniform(0.45, 0.55)
        my = cy + ry * rng.uniform(0.6, 0.7)
        _oval(d, (cx, my), mw, mh, light)
        ny = my - mh * 0.45
        _oval(d, (cx, ny), r * rng.uniform(0.21, 0.27), r * rng.uniform(0.14, 0.18), nose_dark)
        mouth_y = my + mh * 0.45
        d.line([(cx, ny), (cx, mouth_y)], fill=DARK, width=line_w)
        d.line(
            [(cx - mw * 0.6, mouth_y - mh * 0.2), (cx, mouth_y), (cx + mw * 0.6, mouth_y - mh * 0.2)],
            fill=DARK,
            width=line_w,
            joint="curve",
        )
        if rng.random() < 0.4:  # tongue
            _oval(d, (cx, mouth_y + 0.15 * r), 0.16 * r, 0.2 * r, _jitter(rng, (220, 100, 120), 10))
    else:  # wolf / fox: long narrow snout tapering down, nose at the tip
        top_w, tip_w = r * rng.uniform(0.3, 0.38), r * rng.uniform(0.14, 0.2)
        ty = cy + ry * rng.uniform(1.05, 1.3)
        y0 = cy + ry * 0.05
        d.polygon([(cx - top_w, y0), (cx + top_w, y0), (cx + tip_w, ty), (cx - tip_w, ty)], fill=light)
        _oval(d, (cx, ty), tip_w, tip_w * 0.7, light)
        _oval(d, (cx, ty - tip_w * 0.15), tip_w * 0.95, tip_w * 0.6, nose_dark)
        d.line([(cx, ty + tip_w * 0.4), (cx, ty + tip_w * 0.75)], fill=DARK, width=line_w)
        # Cheek ruffs: the face narrows to the snout like an inverted triangle.
        for side in (-1, 1):
            d.polygon(
                [(cx + side * rx * 0.7, cy + 0.1 * ry), (cx + side * rx * 1.25, cy + 0.45 * ry), (cx + side * rx * 0.6, cy + 0.65 * ry)],
                fill=fur,
                outline=_edge(fur),
                width=_stroke(r),
            )


# ---------------------------------------------------------------- public API
@dataclass(frozen=True)
class Traits:
    """What the face is: its class decides subtype, ears and muzzle; the rest is shared across classes."""

    sub: str  # subtype: cat, dog, bigcat, wolf or fox
    ear: str
    muzzle: str
    fur_name: str
    fur: RGB
    pattern: str
    eye_name: str


@dataclass(frozen=True)
class Pose:
    head: tuple[float, float, float, float]  # centre x, centre y, radius x, radius y
    radius: float
    angle: float  # degrees


def draw_face(label: str, seed: int | list[int] | tuple[int, ...], size: int = IMAGE_SIZE) -> tuple[Image.Image, dict[str, str]]:
    """Draw one RGB face of `label`, fully determined by `seed` (passed to np.random.default_rng).

    Returns the image and its attributes: fur_color, pattern, ear_shape,
    eye_color, background, muzzle and subtype (all strings).
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    # One random stream, drawn from in a fixed order (traits, pose, background, layers, finish):
    # reordering the calls below would change every image.
    rng = np.random.default_rng(seed)
    s = size * 2  # supersampled canvas
    traits = _traits(rng, label)
    pose = _pose(rng, s, traits.sub)
    bg, bg_kind = _background(rng, s)
    face = _face_layer(rng, s, traits, pose)
    # Nearest is enough: the 2x reduction and the soft focus below smooth its steps, at a third of the cost
    # of bilinear.
    face = face.rotate(pose.angle, resample=Image.NEAREST, center=pose.head[:2])
    bg.paste(face, (0, 0), face)
    img = _photo_finish(rng, bg.reduce(2), size)
    attrs = {
        "fur_color": traits.fur_name,
        "pattern": traits.pattern,
        "ear_shape": traits.ear,
        "eye_color": traits.eye_name,
        "background": bg_kind,
        "muzzle": traits.muzzle,
        "subtype": traits.sub,
    }
    return img, attrs


def _traits(rng: np.random.Generator, label: str) -> Traits:
    sub = _pick(rng, {"bigcat": 2, "wolf": 1, "fox": 1}) if label == "wild" else label
    if sub == "dog":
        ear = "floppy" if rng.random() < 0.75 else "rounded"
    else:
        ear = "rounded" if sub == "bigcat" else "pointed"
    muzzle = {"cat": "short", "bigcat": "wide", "dog": "long", "wolf": "long", "fox": "long"}[sub]
    fur_name = _pick(rng, FUR_FREQ[label])
    fur = _jitter(rng, FUR_COLORS[fur_name], 6)
    pattern = _pick(rng, PATTERN_FREQ[label])
    eye_name = _pick(rng, EYE_FREQ[label])
    return Traits(sub, ear, muzzle, fur_name, fur, pattern, eye_name)


def _pose(rng: np.random.Generator, s: int, sub: str) -> Pose:
    """The head wanders (vertically too), scales and tilts, so classes share no fixed pixels."""
    r = s * rng.uniform(0.24, 0.31)
    cx = s / 2 + rng.uniform(-0.15, 0.15) * s
    cy = s / 2 + rng.uniform(-0.06, 0.18) * s
    shape = {
        "cat": (1.0, 0.93),
        "dog": (0.95, 1.02),
        "bigcat": (1.1, 0.96),  # head width, height
        "wolf": (0.95, 0.9),
        "fox": (0.92, 0.88),
    }[sub]
    head = (cx, cy, r * shape[0] * rng.uniform(0.95, 1.05), r * shape[1] * rng.uniform(0.95, 1.05))
    return Pose(head, r, rng.uniform(-10, 10))


def _fur_layer(rng: np.random.Generator, s: int, traits: Traits, pose: Pose) -> Image.Image:
    """Ears + head (+ floppy ears), with the markings masked to the fur."""
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    head, fur = pose.head, traits.fur
    if traits.ear != "floppy":
        _ears_back(d, rng, traits.sub, traits.ear, head, fur)
    _oval(d, head[:2], head[2], head[3], fur, outline=_edge(fur), width=_stroke(pose.radius))
    if traits.ear == "floppy":
        _ears_front(d, rng, head, fur)
    marks = _pattern(rng, s, traits.pattern, head, fur)
    if marks is not None:
        marks.putalpha(ImageChops.multiply(marks.getchannel("A"), layer.getchannel("A")))
        layer.alpha_composite(marks)
    return layer


def _face_layer(rng: np.random.Generator, s: int, traits: Traits, pose: Pose) -> Image.Image:
    """The whole face on a transparent canvas: mane, fur, eyes, muzzle."""
    fur = _fur_layer(rng, s, traits, pose)  # drawn first: the mane goes under it, but its draws come after
    face = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(face)
    if traits.sub == "bigcat" and rng.random() < 0.6:
        _mane(d, rng, pose.head, traits.fur)
    face.alpha_composite(fur)
    _eyes(d, rng, traits.sub, pose.head, _jitter(rng, EYE_COLORS[traits.eye_name], 10))
    _muzzle(d, rng, traits.sub, pose.head, traits.fur)
    return face


def _photo_finish(rng: np.random.Generator, img: Image.Image, size: int) -> Image.Image:
    """Soft focus, lighting and sensor noise, as a photo has them (see the module docstring)."""
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.9) * size / 128))
    arr = np.asarray(img, dtype=np.float32)
    # Contrast, brightness and a colour cast (white balance), so colour sums mean little.
    arr = (arr - 128) * rng.uniform(0.8, 1.15) + 128 + rng.uniform(-20, 20)
    arr *= rng.uniform(0.92, 1.08, 3).astype(np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(0.5, 2)  # faint sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def draw_photo(label: str, seed: int | list[int] | tuple[int, ...], size: int) -> tuple[Image.Image, dict[str, str]]:
    """A face at photo size (AFHQ's is 512): the `draw_face` drawing at IMAGE_SIZE, enlarged, with
    film grain, so that it is as large and as dear to decode as a photo of that size.

    Drawing at 512 px directly would take 16 times the pixels for nothing the network sees (it
    trains at 64 to 128 px); the grain gives the JPEG the fine detail that real fur gives it. The
    drawing, and so the class and the attributes, is exactly the one `draw_face(label, seed)` draws.
    """
    image, attrs = draw_face(label, seed)
    if size <= IMAGE_SIZE:
        raise ValueError(f"draw_photo is for sizes above {IMAGE_SIZE}; use draw_face for {size}")
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    # Its own random stream: the drawing's stays exactly draw_face's.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(size,)))
    tile = _grain_tile(GRAIN_SIGMAS[int(rng.integers(len(GRAIN_SIGMAS)))], size)
    x, y = (int(v) for v in rng.integers(0, size, 2))
    grain = tile.crop((x, y, x + size, y + size))
    # Luminance grain, the same on the three channels; ImageChops in C: about 4 ms at 512 px.
    return ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), 1.0, -128), attrs


@functools.cache
def _grain_tile(sigma: int, size: int) -> Image.Image:
    """Gaussian grain around 128, twice the image's side, made once per process from a fixed seed:
    each photo takes a window of it at its own offset (drawing fresh noise per image cost 8-11 ms)."""
    noise = np.random.default_rng(sigma).normal(128, sigma, (2 * size, 2 * size))
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "L")
