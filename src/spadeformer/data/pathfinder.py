"""LRA Pathfinder / Path-X: a vectorised generator in the release layout, and its loader.

**Task** (Linsley et al. 2018; Kim et al. 2020; LRA): an image holds two *target* paths of
short line segments ("paddles"), distractor paths and paddles, and two round markers; label 1
when the markers sit on the two ends of one target, 0 when on ends of the two different targets.
Models read the pixels in raster order: 32x32 -> 1024 steps, 128x128 (Path-X) -> 16384 steps.

**Generator**: the algorithm of the snakes2 script that made the release
(github.com/drewlinsley/pathfinder) with the release's parameters
(:meth:`PathfinderParams.preset`), vectorised over images and candidates. A path is a chain
of ``paddle_length`` paddles with gaps of 2m (m = margin); each turn d is drawn with snakes2's
weight ``cos(min(|d| * continuity, pi/2))**2`` among the candidates whose gap and paddle stay
2m away from every other paddle but the one continued (an occupancy-grid test, so paths never
touch or cross). The targets start ``seed_distance`` apart near the centre and grow in turns;
an image whose targets get stuck is redrawn. Distractor paths, then single paddles (snakes2's
budget ``150 * 123.5 / (7.5 + 13 m + 4 m^2)`` paddles) fill the free space. Markers go on one
target's origin and on the end of the same (label 1) or the other (0) target. Lines are
anti-aliased at the release's contrast, markers at 1, and each image is scaled to a maximum of
255. Not pixel-identical to the release (different rasteriser and RNG). Labels are exactly
balanced. Speed (one CPU core of a 2-core VM, PNG writing included): about 400 images/s at
32x32 and 60 images/s at 128x128 when the machine is otherwise idle (110-180 and 10-14 under
load).

**Layout** written (and read by :class:`PathfinderDataset`, defined in
:mod:`spadeformer.data.image` and re-exported here), the release's
``pathfinder32/curv_contour_length_14`` folder::

    <root>/imgs/<batch>/sample_<i>.png    8-bit grayscale PNG; i restarts at 0 in each batch
    <root>/metadata/<batch>.npy           one line per image, space separated:
        imgs/<batch> sample_<i>.png <i> <label> <continuity> <contour_length>
        <distractor_length> <paddle_length> <paddle_thickness> <margin> 1

Metadata files are plain text despite the ``.npy`` name, as in the release (LRA's and S4's
readers split them on newlines); the loader uses fields 0, 1 and 3, and also accepts a genuine
numpy ``.npy`` holding a 2-D string array of the same fields.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spadeformer.data.image import PathfinderDataset  # the loader lives with the image loaders
from spadeformer.data.lra_common import import_pil

__all__ = [
    "PathfinderParams",
    "PathfinderDataset",
    "generate_pathfinder",
    "render",
    "render_ref",
    "sample_pathfinder",
]

@dataclass(frozen=True)
class PathfinderParams:
    """Geometry of one Pathfinder image (names follow the snakes2 script's arguments).

    Attributes:
        size: image side in pixels (32 for Pathfinder, 128 for Path-X).
        contour_length: paddles per target path (14 in LRA's "hard" set).
        paddle_length: length of one paddle in pixels.
        paddle_thickness: line width in pixels.
        margins: the paddle margin m is drawn per image from these; gaps are 2m pixels and
            paddles of different paths stay at least 2m apart.
        continuity: turn prior ``cos(min(|d| * continuity, pi/2))**2``.
        seed_distance: distance in pixels between the two targets' starting points.
        marker_radius: radius in pixels of the two end markers.
        distractor_length: paddles per distractor path.
        n_distractors: number of distractor paths (skipped when they do not fit).
        single_paddles: fill the remaining space with single distractor paddles.
        contrast: paddle intensity relative to the markers (snake x paddle contrast).
        padding: border in pixels that no paddle enters.
        max_retrial: attempts per distractor path before it is skipped.
    """

    size: int = 32
    contour_length: int = 14
    paddle_length: float = 2.0
    paddle_thickness: float = 0.5
    margins: tuple[int, ...] = (1,)
    continuity: float = 1.0
    seed_distance: float = 7.0
    marker_radius: float = 1.5
    distractor_length: int = 4
    n_distractors: int = 5
    single_paddles: bool = True
    contrast: float = 1.5
    padding: int = 1
    max_retrial: int = 4

    def __post_init__(self):
        rules = [
            ("size", self.size >= 8, ">= 8"),
            ("margins", len(self.margins) > 0 and min(self.margins) >= 1, "ints >= 1, not empty"),
            ("padding", 0 <= self.padding < self.size // 4, "in [0, size // 4)"),
            *((n, getattr(self, n) >= 1, ">= 1") for n in ("contour_length", "distractor_length")),
            *((n, getattr(self, n) >= 0, ">= 0") for n in ("n_distractors", "max_retrial")),
            *((n, getattr(self, n) > 0, "> 0") for n in (
                "paddle_length", "paddle_thickness", "continuity", "seed_distance",
                "marker_radius", "contrast")),
        ]
        for name, ok, allowed in rules:
            if not ok:
                raise ValueError(
                    f"PathfinderParams.{name} must be {allowed}, got {getattr(self, name)!r}"
                )

    @classmethod
    def preset(cls, size: int, **overrides) -> PathfinderParams:
        """The release's parameters for ``size`` 32 (Pathfinder) or 128 (Path-X).

        From LRA's TFDS builders (snakes2 arguments): 32 -> paddle_length 2, thickness 0.5,
        margin 1, continuity 1.0, seed_distance 7, marker_radius 1.5, distractors 20 // 4 of
        length 14 // 3, contrast 2 x 0.75; 128 -> paddle_length 5 (snakes2 default), thickness
        1.5, margin 2 or 3, continuity 1.8, seed_distance 20, marker_radius 3, distractors
        35 / (14/3) (-> 8) of length 4, contrast 0.9. Both: contour_length 14, padding 1.
        """
        if size == 32:
            base = cls()
        elif size == 128:
            base = cls(size=128, paddle_length=5.0, paddle_thickness=1.5, margins=(2, 3),
                       continuity=1.8, seed_distance=20.0, marker_radius=3.0,
                       distractor_length=4, n_distractors=8, contrast=0.9)
        else:
            raise ValueError(f"size must be 32 or 128 for a preset, got {size}; "
                             "build PathfinderParams(size=...) directly for other sizes")
        return replace(base, **overrides)


# ----------------------------------------------------------------------------------------------
# Rasterisation: a windowed fast path (batched over images) and a dense reference.


def _point_segment_distance(px, py, segs):
    """Distance from points to segments ``segs[..., 0:4] = (x0, y0, x1, y1)``, broadcast."""
    x0, y0, x1, y1 = segs[..., 0], segs[..., 1], segs[..., 2], segs[..., 3]
    dx, dy = x1 - x0, y1 - y0
    len2 = np.maximum(dx * dx + dy * dy, 1e-12)
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / len2, 0.0, 1.0)
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


def _windows(segs: np.ndarray, radius: float, max_len: float):
    """Pixels around each segment (Q, 4): rows (Q, w, 1), cols (Q, 1, w) ints and their
    centres' distance to the segment (Q, w, w). All windows share one side, enough for a
    segment of ``max_len`` dilated by ``radius``, so they are computed in one call. Pixel
    (row r, column c) has its centre at (x=c, y=r); indices may fall outside the image."""
    off = np.arange(int(math.ceil(max_len + 2 * radius)) + 2)
    cols = np.floor(np.minimum(segs[:, 0], segs[:, 2]) - radius).astype(np.intp)
    rows = np.floor(np.minimum(segs[:, 1], segs[:, 3]) - radius).astype(np.intp)
    cols, rows = cols[:, None, None] + off, rows[:, None, None] + off[:, None]
    return rows, cols, _point_segment_distance(cols, rows, segs[:, None, None, :])


def _scatter_max(img, owner, rows, cols, dist, radius, value) -> None:
    """img[owner, row, col] = max(img, value(dist)) for window pixels closer than radius."""
    size = img.shape[-1]
    keep = (dist < radius) & (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    who = np.broadcast_to(owner[:, None, None], keep.shape)[keep]
    np.maximum.at(img, (who, np.broadcast_to(rows, keep.shape)[keep],
                        np.broadcast_to(cols, keep.shape)[keep]), value(dist[keep]))


def _coverage(dist, thickness):
    """Anti-aliased coverage of a line of width ``thickness`` at a pixel ``dist`` away."""
    return np.clip(thickness / 2 + 0.5 - dist, 0.0, 1.0)


def _disc(dist, radius):
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Scale each image (..., H, W) so its maximum is 255 (snakes2 normalises by the max)."""
    peak = np.maximum(img.max(axis=(-2, -1), keepdims=True), 1e-12)
    return np.rint(img * (255.0 / peak)).astype(np.uint8)


def _render_batch(segs: np.ndarray, owner: np.ndarray, markers: np.ndarray,
                  params: PathfinderParams) -> np.ndarray:
    """Paddles ``segs`` (Q, 4) of images ``owner`` (Q,), markers (N, M, 2) -> uint8 (N, S, S)."""
    t, r, n = params.paddle_thickness, params.marker_radius, markers.shape[0]
    img = np.zeros((n, params.size, params.size))
    if len(segs):
        max_len = float(np.max(np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])))
        _scatter_max(img, owner, *_windows(segs, t / 2 + 0.5, max_len), t / 2 + 0.5,
                     lambda d: params.contrast * _coverage(d, t))
    m = markers.reshape(-1, 2)  # markers: zero-length segments, i.e. discs
    _scatter_max(img, np.repeat(np.arange(n), markers.shape[1]),
                 *_windows(np.concatenate([m, m], axis=1), r + 0.5, 0.0), r + 0.5,
                 lambda d: _disc(d, r))
    return _to_uint8(img)


def render(segs: np.ndarray, markers: np.ndarray, params: PathfinderParams) -> np.ndarray:
    """Draw one image: paddles ``segs`` (P, 4) = (x0, y0, x1, y1), marker centres (M, 2) (x, y)
    -> uint8 (size, size). Lines are anti-aliased with intensity ``params.contrast``, markers
    are discs of intensity 1, and the image is scaled so that its maximum is 255."""
    segs = np.asarray(segs, dtype=np.float64).reshape(-1, 4)
    owner = np.zeros(len(segs), dtype=np.intp)
    return _render_batch(segs, owner, np.asarray(markers, dtype=np.float64)[None], params)[0]


def render_ref(segs: np.ndarray, markers: np.ndarray, params: PathfinderParams) -> np.ndarray:
    """Reference twin of :func:`render`: every pixel against every paddle, densely."""
    size, t = params.size, params.paddle_thickness
    img = np.zeros((size, size))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    for seg in np.asarray(segs, dtype=np.float64).reshape(-1, 4):
        img = np.maximum(img, params.contrast * _coverage(_point_segment_distance(xs, ys, seg), t))
    for cx, cy in np.asarray(markers, dtype=np.float64):
        img = np.maximum(img, _disc(np.hypot(xs - cx, ys - cy), params.marker_radius))
    return _to_uint8(img)


# ----------------------------------------------------------------------------------------------
# Geometry, vectorised over a batch of images that share one margin: Python loops run over
# paddles, numpy over images and candidates.


def _single_paddle_budget(params: PathfinderParams, margin: int) -> int:
    """snakes2's paddle budget, minus the paddles of the target and distractor paths."""
    if not params.single_paddles:
        return 0
    total = int(150 / ((7.5 + 13 * margin + 4 * margin * margin) / 123.5))
    total -= 2 * params.contour_length + params.n_distractors * params.distractor_length
    return max(0, total)


class _Walkers:
    """State of one path per image (arrays indexed by image)."""

    def __init__(self, n: int, path_id: int = 0):
        self.path_id = path_id
        self.tail = np.zeros((n, 2))
        self.head = np.zeros((n, 2))
        self.theta = np.zeros(n)
        self.last = np.zeros(n, dtype=np.int32)  # id of the newest paddle


class _Batch:
    """Occupancy grids of N images: pixel -> id of the paddle whose exclusion zone covers it.

    0 = free, -1 = outside the allowed area (frame and ``padding`` border), so out-of-bounds
    candidate points read as blocked. Points are tested by the pixel they round to.
    """

    def __init__(self, params: PathfinderParams, margin: int, n: int, cap: int | None = None):
        p = self.p = params
        self.n = n
        self.margin = margin
        self.radius = 2.0 * margin  # paddles of different paths keep this distance (snakes2)
        self.gap = 2.0 * margin  # between consecutive paddles of a path (pivot step L + 2m)
        self.lo, self.hi = float(p.padding), float(p.size - 1 - p.padding)
        # blocked frame wide enough that no candidate point or window leaves the grid
        self.frame = f = int(math.ceil(p.seed_distance + 2 * max(p.margins) + p.paddle_length)) + 2
        self.side = side = p.size + 2 * f
        self.base = np.full((side, side), -1, dtype=np.int32)
        inner = slice(f + p.padding, f + p.size - p.padding)
        self.base[inner, inner] = 0
        self.occ = np.repeat(self.base[None], n, axis=0)
        self.budget = _single_paddle_budget(p, margin)
        if cap is None:
            cap = 2 * p.contour_length + p.n_distractors * p.distractor_length + self.budget
        self.segs = np.zeros((n, cap, 4))
        self.path = np.full((n, cap), -1, dtype=np.int64)
        self.count = np.zeros(n, dtype=np.int64)
        # sample offsets (<= 0.5 px apart) along a step (gap + paddle) and along a lone paddle
        L = p.paddle_length
        self.step_s = np.linspace(0.5, self.gap + L, int(math.ceil((self.gap + L) / 0.5)))
        self.seed_s = np.linspace(0.0, L, int(math.ceil(L / 0.5)) + 1)

    def reset(self, idx: np.ndarray) -> None:
        self.occ[idx] = self.base
        self.count[idx] = 0

    def _flat(self, idx: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Flat index into ``occ`` of image idx (M, 1, 1), pixel rows/cols (M, ...)."""
        return (idx * self.side + rows + self.frame) * self.side + cols + self.frame

    def valid(self, idx: np.ndarray, xs: np.ndarray, ys: np.ndarray,
              allowed: np.ndarray | None = None) -> np.ndarray:
        """Candidate points xs, ys (M, K, S) of images idx (M,) -> (M, K) bool."""
        flat = self._flat(idx[:, None, None], np.rint(ys).astype(np.intp),
                          np.rint(xs).astype(np.intp))
        o = self.occ.reshape(-1)[flat]
        free = o == 0
        if allowed is not None:
            free |= o == allowed[:, None, None]
        return free.all(axis=-1)

    def commit(self, idx: np.ndarray, segs: np.ndarray, path_ids, rank=None) -> np.ndarray:
        """Add paddles segs (Q, 4) to images idx (Q,) (``rank`` orders repeats of an image);
        mark free pixels within ``radius``; return the paddle ids (Q,), 1-based per image."""
        slot = self.count[idx] + (0 if rank is None else rank)
        ids = (slot + 1).astype(np.int32)
        self.segs[idx, slot] = segs
        self.path[idx, slot] = path_ids
        np.add.at(self.count, idx, 1)
        rows, cols, dist = _windows(segs, self.radius, self.p.paddle_length)
        flat = self._flat(idx[:, None, None], rows, cols)
        occ = self.occ.reshape(-1)
        write = (dist <= self.radius) & (occ[flat] == 0)  # a joint stays the older paddle's
        occ[flat[write]] = np.broadcast_to(ids[:, None, None], write.shape)[write]
        return ids

    def seeds(self, idx: np.ndarray, k: int, rng: np.random.Generator):
        """k candidate lone paddles per image: tails uniform in the allowed area, directions
        uniform -> (tx, ty, theta) (M, k) and validity (M, k)."""
        m = len(idx)
        tx = self.lo + (self.hi - self.lo) * rng.random((m, k))
        ty = self.lo + (self.hi - self.lo) * rng.random((m, k))
        th = rng.uniform(-math.pi, math.pi, (m, k))
        xs = tx[..., None] + np.cos(th)[..., None] * self.seed_s
        ys = ty[..., None] + np.sin(th)[..., None] * self.seed_s
        return tx, ty, th, self.valid(idx, xs, ys)

    def start(self, w: _Walkers, idx, x, y, theta, path_id) -> None:
        """First paddle of a path from tail (x, y) in direction theta, for images idx."""
        L = self.p.paddle_length
        hx, hy = x + L * np.cos(theta), y + L * np.sin(theta)
        w.tail[idx, 0], w.tail[idx, 1] = x, y
        w.head[idx, 0], w.head[idx, 1] = hx, hy
        w.theta[idx] = theta
        w.last[idx] = self.commit(idx, np.stack([x, y, hx, hy], axis=1), path_id)

    def step(self, w: _Walkers, idx: np.ndarray, rng: np.random.Generator,
             n_turns: int = 16) -> np.ndarray:
        """Add one paddle to path ``w`` of images idx; returns (M,) success.

        The turn d is drawn with weight cos(min(|d| * continuity, pi/2))**2 (snakes2's prior)
        among ``n_turns`` jittered candidates whose gap and paddle are free.
        """
        p = self.p
        m = len(idx)
        dmax = min(math.pi / (2 * p.continuity), math.pi)
        width = 2 * dmax / n_turns
        d = width * (np.arange(n_turns) + rng.random((m, n_turns))) - dmax
        weight = np.cos(np.minimum(np.abs(d) * p.continuity, math.pi / 2)) ** 2
        theta = w.theta[idx, None] + d  # (M, K)
        c, s = np.cos(theta), np.sin(theta)
        head = w.head[idx]
        xs = head[:, 0, None, None] + c[..., None] * self.step_s
        ys = head[:, 1, None, None] + s[..., None] * self.step_s
        weight = weight * self.valid(idx, xs, ys, allowed=w.last[idx])
        cum = np.cumsum(weight, axis=1)
        ok = cum[:, -1] > 0
        u = rng.random(m) * cum[:, -1]
        k = np.minimum((cum <= u[:, None]).sum(axis=1), n_turns - 1)[ok]
        sel = idx[ok]
        rows = np.flatnonzero(ok)
        th, ux, uy = theta[rows, k], c[rows, k], s[rows, k]
        ax, ay = head[ok, 0] + self.gap * ux, head[ok, 1] + self.gap * uy
        bx, by = ax + p.paddle_length * ux, ay + p.paddle_length * uy
        w.theta[sel] = th
        w.head[sel, 0], w.head[sel, 1] = bx, by
        w.last[sel] = self.commit(sel, np.stack([ax, ay, bx, by], axis=1), w.path_id)
        return ok


def _fits(b: _Batch, idx, x, y, theta) -> np.ndarray:
    xs = x[:, None, None] + np.cos(theta)[:, None, None] * b.seed_s
    ys = y[:, None, None] + np.sin(theta)[:, None, None] * b.seed_s
    return b.valid(idx, xs, ys)[:, 0]


def _targets(b: _Batch, rng: np.random.Generator, max_rounds: int = 100) -> list[_Walkers]:
    """Two target paths per image; stuck targets are redrawn from scratch (as snakes2 does).

    Each round runs several independent attempts per pending image on a scratch batch and
    keeps the first success, so a few rounds suffice even when most attempts get stuck.
    """
    p = b.p
    walkers = [_Walkers(b.n, 0), _Walkers(b.n, 1)]
    sd = p.seed_distance
    lo, hi = 2 * sd, p.size - 1 - 2 * sd  # snakes2 keeps the first seed 2*sd from the border
    if lo > hi:
        lo, hi = b.lo, b.hi
    pending = np.arange(b.n)
    for _ in range(max_rounds):
        if len(pending) == 0:
            return walkers
        reps = max(4, -(-128 // len(pending)))  # attempts per pending image
        t = _Batch(p, b.margin, len(pending) * reps, cap=2 * p.contour_length)
        tw = [_Walkers(t.n, 0), _Walkers(t.n, 1)]
        att = np.arange(t.n)
        x1, y1 = lo + (hi - lo) * rng.random((2, t.n))
        phi, th1, th2 = rng.uniform(-math.pi, math.pi, (3, t.n))
        x2, y2 = x1 + sd * np.cos(phi), y1 + sd * np.sin(phi)
        alive = _fits(t, att, x1, y1, th1)
        a = att[alive]
        t.start(tw[0], a, x1[alive], y1[alive], th1[alive], 0)
        alive[alive] = _fits(t, a, x2[alive], y2[alive], th2[alive])
        a = att[alive]
        t.start(tw[1], a, x2[alive], y2[alive], th2[alive], 1)
        for _ in range(p.contour_length - 1):
            for w in tw:  # both grow in turns, as in snakes2
                alive[alive] = t.step(w, att[alive], rng)
        # first successful attempt of each pending image
        ok = alive.reshape(len(pending), reps)
        done = ok.any(axis=1)
        src = ok[done].argmax(axis=1) + reps * np.flatnonzero(done)
        dst = pending[done]
        b.occ[dst], b.segs[dst, : t.segs.shape[1]] = t.occ[src], t.segs[src]
        b.path[dst, : t.path.shape[1]], b.count[dst] = t.path[src], t.count[src]
        for w, tws in zip(walkers, tw, strict=True):
            w.tail[dst], w.head[dst], w.theta[dst] = tws.tail[src], tws.head[src], tws.theta[src]
            w.last[dst] = tws.last[src]
        pending = pending[~done]
    raise RuntimeError(
        f"could not fit two target paths of {p.contour_length} paddles in a {p.size}x{p.size} "
        "image; shorten contour_length or paddle_length"
    )


def _distractors(b: _Batch, rng: np.random.Generator) -> None:
    p = b.p
    for i in range(p.n_distractors):
        w = _Walkers(b.n, path_id=2 + i)
        todo = np.arange(b.n)
        for _ in range(p.max_retrial + 1):
            if len(todo) == 0:
                break
            tx, ty, th, ok = b.seeds(todo, 16, rng)
            has = ok.any(axis=1)  # no room for a seed: give this distractor up (snakes2)
            todo, tx, ty, th, ok = todo[has], tx[has], ty[has], th[has], ok[has]
            j = np.argmax(ok, axis=1)
            r = np.arange(len(todo))
            snap_occ, snap_count = b.occ[todo], b.count[todo]
            b.start(w, todo, tx[r, j], ty[r, j], th[r, j], w.path_id)
            alive = np.ones(len(todo), dtype=bool)
            for _ in range(p.distractor_length - 1):
                alive[alive] = b.step(w, todo[alive], rng)
            failed = ~alive
            b.occ[todo[failed]] = snap_occ[failed]  # roll a stuck distractor back
            b.count[todo[failed]] = snap_count[failed]
            todo = todo[failed]


def _single_paddles(b: _Batch, rng: np.random.Generator, k: int = 64, max_rounds: int = 100):
    """Single paddles in rounds of k candidates per image, kept greedily when free and not
    within ``radius + paddle_length`` (midpoints; conservative) of another kept candidate."""
    placed = np.zeros(b.n, dtype=np.int64)
    todo = np.arange(b.n) if b.budget > 0 else np.arange(0)
    L = b.p.paddle_length
    for _ in range(max_rounds):
        if len(todo) == 0:
            return
        tx, ty, th, ok = b.seeds(todo, k, rng)
        mx, my = tx + 0.5 * L * np.cos(th), ty + 0.5 * L * np.sin(th)
        clash = (mx[:, :, None] - mx[:, None, :]) ** 2 + (my[:, :, None] - my[:, None, :]) ** 2
        clash = clash < (b.radius + L) ** 2  # (M, k, k)
        keep = np.zeros_like(ok)
        room = b.budget - placed[todo]
        for i in range(k):
            keep[:, i] = ok[:, i] & ~(clash[:, i] & keep).any(axis=1) & (keep.sum(axis=1) < room)
        img, cand = np.nonzero(keep)
        rank = np.cumsum(keep, axis=1)[img, cand] - 1
        x0, y0, t = tx[img, cand], ty[img, cand], th[img, cand]
        segs = np.stack([x0, y0, x0 + L * np.cos(t), y0 + L * np.sin(t)], axis=1)
        b.commit(todo[img], segs, 1000 + placed[todo[img]] + rank, rank)
        placed[todo] += keep.sum(axis=1)
        todo = todo[ok.any(axis=1) & (placed[todo] < b.budget)]


def sample_pathfinder(
    params: PathfinderParams, labels, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """Draw a batch of images.

    Args:
        params: geometry (see :class:`PathfinderParams`).
        labels: (N,) ints; 1 = markers on the two ends of one target path, 0 = on ends of the
            two different targets.
        rng: the numpy generator to draw from.

    Returns:
        ``(images uint8 (N, size, size), geometries)``; geometry n holds ``segments`` (P, 4)
        float (x0, y0, x1, y1) in drawing order, ``path`` (P,) int (0 and 1 are the targets,
        2.. the distractor paths, >= 1000 single paddles), ``markers`` (2, 2) (x, y) centres
        (origin marker first), ``margin`` and ``label``.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
    n = len(labels)
    margins = np.asarray(params.margins)[rng.integers(len(params.margins), size=n)]
    # as snakes2: a marker on one target's origin and one on the same / other target's end
    origin = rng.integers(2, size=n)
    terminal = np.where(labels == 1, origin, 1 - origin)
    images = np.zeros((n, params.size, params.size), dtype=np.uint8)
    geometries: list[dict] = [{} for _ in range(n)]
    for margin in np.unique(margins):
        members = np.flatnonzero(margins == margin)
        b = _Batch(params, int(margin), len(members))
        walkers = _targets(b, rng)
        _distractors(b, rng)
        _single_paddles(b, rng)
        r = np.arange(len(members))
        tails = np.stack([walkers[0].tail, walkers[1].tail])  # (2, M, 2)
        heads = np.stack([walkers[0].head, walkers[1].head])
        markers = np.stack([tails[origin[members], r], heads[terminal[members], r]], axis=1)
        used = np.arange(b.segs.shape[1])[None, :] < b.count[:, None]
        owner = np.broadcast_to(r[:, None], used.shape)[used]
        images[members] = _render_batch(b.segs[used], owner, markers, params)
        for j, n_i in enumerate(members):
            geometries[n_i] = {
                "segments": b.segs[j, : b.count[j]].copy(),
                "path": b.path[j, : b.count[j]].copy(),
                "markers": markers[j],
                "margin": int(margin),
                "label": int(labels[n_i]),
            }
    return images, geometries


_CHUNK = 256  # images drawn together; chunk c uses numpy.random.default_rng([seed, c])


def generate_pathfinder(
    out_dir: str | os.PathLike,
    size: int = 32,
    count: int = 200_000,
    seed: int = 0,
    images_per_batch: int = 1000,
    params: PathfinderParams | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, object]:
    """Generate a Pathfinder (size 32) or Path-X (size 128) data set in the release layout.

    Args:
        out_dir: folder that receives ``imgs/`` and ``metadata/`` (e.g.
            ``pathfinder32/curv_contour_length_14``); created if missing.
        size: 32 (Pathfinder) or 128 (Path-X); selects :meth:`PathfinderParams.preset`.
        count: number of images (the release has 200,000 per difficulty).
        seed: seed; images are drawn in chunks of 256 from ``default_rng([seed, chunk])`` and
            the balanced labels from a permutation drawn from ``default_rng(seed)``.
        images_per_batch: images per ``imgs/<batch>`` folder and ``metadata/<batch>.npy``.
        params: full geometry instead of the preset (its ``size`` must equal ``size``).
        progress: show a tqdm progress bar.
        overwrite: replace an existing ``imgs/`` and ``metadata/`` (else they are refused:
            new files among old ones would mix two data sets). Either way the set is written
            into a hidden folder of ``out_dir`` and moved in when complete, so an interrupted
            run leaves the old set whole (an overwrite needs room for both meanwhile).

    Returns:
        ``{"root": Path, "metadata": [Path, ...], "count": int, "params": dict}``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if images_per_batch < 1:
        raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
    if params is None:
        params = PathfinderParams.preset(size)
    elif params.size != size:
        raise ValueError(f"params.size={params.size} does not match size={size}")
    Image = import_pil()
    root = Path(out_dir)
    old = [d for d in (root / "imgs", root / "metadata") if d.exists() or d.is_symlink()]
    if old and not overwrite:
        held = ", ".join(f"{d.name}/" for d in old)
        raise FileExistsError(f"{str(root)!r} already holds a data set ({held}): pass "
                              "overwrite=True (--overwrite) to replace it, or another folder")
    root.mkdir(parents=True, exist_ok=True)
    # written beside, then moved in: an interrupted run leaves the old set (or none) whole
    work = Path(tempfile.mkdtemp(prefix=".pathfinder-incomplete-", dir=root))
    try:
        names = _write_images(work, params, seed, count, images_per_batch, Image, progress)
        for d in old:
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)
            else:
                d.unlink()
        for sub in ("imgs", "metadata"):
            os.replace(work / sub, root / sub)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta_paths = [root / "metadata" / name for name in names]
    return {"root": root, "metadata": meta_paths, "count": count, "params": asdict(params)}


def _write_images(root: Path, params: PathfinderParams, seed: int, count: int,
                  images_per_batch: int, Image, progress: bool) -> list[str]:
    """Draw ``count`` images into ``root/imgs/<batch>/`` with ``root/metadata/<batch>.npy``;
    returns the metadata file names in order."""
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(seed).permutation(np.arange(count) % 2)  # exactly balanced
    names: list[str] = []
    lines: list[str] = []
    bar = tqdm(total=count, desc=f"Pathfinder{params.size}", unit="img", disable=not progress)
    for c0 in range(0, count, _CHUNK):
        chunk_labels = labels[c0 : c0 + _CHUNK]
        images, geoms = sample_pathfinder(
            params, chunk_labels, np.random.default_rng([seed, c0 // _CHUNK])
        )
        for j, (image, geom) in enumerate(zip(images, geoms, strict=True)):
            n = c0 + j
            b, i = divmod(n, images_per_batch)
            img_dir = root / "imgs" / str(b)
            if i == 0 or j == 0:
                img_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_dir / f"sample_{i}.png")
            lines.append(  # snakes2's metadata fields
                f"imgs/{b} sample_{i}.png {i} {chunk_labels[j]} {params.continuity} "
                f"{params.contour_length} {params.distractor_length} {params.paddle_length} "
                f"{params.paddle_thickness} {geom['margin']} 1"
            )
            if i == images_per_batch - 1 or n == count - 1:
                (root / "metadata" / f"{b}.npy").write_text("\n".join(lines) + "\n",
                                                           encoding="utf-8")
                names.append(f"{b}.npy")
                lines = []
        bar.update(len(images))
    bar.close()
    return names
