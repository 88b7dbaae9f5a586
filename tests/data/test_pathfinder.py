import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image  # Pillow: the [data] extra, needed by these tests

from spadeformer.data.lra_common import CorruptFileError, import_pil
from spadeformer.data.pathfinder import (
    PathfinderDataset,
    PathfinderParams,
    generate_pathfinder,
    render,
    render_ref,
    sample_pathfinder,
)

# --- independent geometry helpers ------------------------------------------------------------


def point_seg(p, a, b):
    """Distance from points p (..., 2) to segments a-b (..., 2)."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def seg_seg(s, u):
    """Pairwise distance between segments s (P, 4) and u (Q, 4) -> (P, Q)."""
    a, b = s[:, None, :2], s[:, None, 2:]
    c, d = u[None, :, :2], u[None, :, 2:]
    a, b, c, d = np.broadcast_arrays(a, b, c, d)

    def cross(o, p, q):
        return (p[..., 0] - o[..., 0]) * (q[..., 1] - o[..., 1]) - (p[..., 1] - o[..., 1]) * (
            q[..., 0] - o[..., 0])

    crossing = (np.sign(cross(a, b, c)) * np.sign(cross(a, b, d)) < 0) & (
        np.sign(cross(c, d, a)) * np.sign(cross(c, d, b)) < 0)
    dist = np.minimum.reduce(
        [point_seg(a, c, d), point_seg(b, c, d), point_seg(c, a, b), point_seg(d, a, b)])
    return np.where(crossing, 0.0, dist)


def check_geometry(image, geom, params):
    segs, path, m = geom["segments"], geom["path"], geom["margin"]
    assert m in params.margins
    lengths = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
    np.testing.assert_allclose(lengths, params.paddle_length, rtol=1e-9)
    lo, hi = params.padding - 0.5, params.size - 1 - params.padding + 0.5
    assert segs.min() >= lo and segs.max() <= hi

    # targets: contour_length paddles, gaps of 2m, bounded turns
    ends = {}
    for t in (0, 1):
        s = segs[path == t]
        assert len(s) == params.contour_length
        np.testing.assert_allclose(np.hypot(*(s[1:, :2] - s[:-1, 2:]).T), 2 * m, rtol=1e-9)
        heading = np.arctan2(s[:, 3] - s[:, 1], s[:, 2] - s[:, 0])
        turn = np.abs((np.diff(heading) + np.pi) % (2 * np.pi) - np.pi)
        assert turn.max() <= np.pi / (2 * params.continuity) + 1e-9
        ends[t] = (s[0, :2], s[-1, 2:])  # origin tail, terminal head

    # markers: one on an origin, one on a terminal end; same target iff label 1
    mk = geom["markers"]
    origin_of = [t for t in (0, 1) if np.allclose(ends[t][0], mk[0])]
    terminal_of = [t for t in (0, 1) if np.allclose(ends[t][1], mk[1])]
    assert len(origin_of) == 1 and len(terminal_of) == 1
    assert (origin_of[0] == terminal_of[0]) == (geom["label"] == 1)

    # paths keep 2m apart (up to the 1-pixel resolution of the occupancy test), and a path
    # does not come back onto itself
    d = seg_seg(segs, segs)
    idx = np.arange(len(segs))
    same = path[:, None] == path[None, :]
    neighbours = same & (np.abs(idx[:, None] - idx[None, :]) <= 1)
    assert d[~neighbours].min() >= 2 * m - 1.0

    # every lit pixel is explained by a paddle or a marker
    ys, xs = np.mgrid[0 : params.size, 0 : params.size]
    pix = np.stack([xs, ys], -1).reshape(-1, 1, 2).astype(float)
    near_line = (point_seg(pix, segs[None, :, :2], segs[None, :, 2:]) < params.paddle_thickness / 2
                 + 0.5).any(1)
    near_marker = (np.linalg.norm(pix - mk[None], axis=-1) < params.marker_radius + 0.5).any(1)
    lit = image.reshape(-1) > 0
    assert not (lit & ~near_line & ~near_marker).any()
    for x, y in mk:
        assert image[int(round(y)), int(round(x))] >= 128  # markers are bright


# --- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 128])
def test_render_matches_dense_reference(size):
    params = PathfinderParams.preset(size)
    rng = np.random.default_rng(0)
    tails = rng.uniform(-2, size + 1, (40, 2))  # some poke out of the image
    theta = rng.uniform(-np.pi, np.pi, 40)
    L = params.paddle_length
    segs = np.concatenate([tails, tails + L * np.stack([np.cos(theta), np.sin(theta)], 1)], 1)
    markers = np.array([[3.2, 4.7], [size - 1.0, size / 2]])
    fast = render(segs, markers, params)
    ref = render_ref(segs, markers, params)
    assert fast.dtype == np.uint8 and fast.shape == (size, size)
    assert fast.max() == 255
    np.testing.assert_array_equal(fast, ref)


# --- generator ---------------------------------------------------------------------------------


def test_sampled_images_have_the_task_geometry_32():
    params = PathfinderParams.preset(32)
    labels = np.arange(48) % 2
    images, geoms = sample_pathfinder(params, labels, np.random.default_rng(5))
    assert images.shape == (48, 32, 32) and images.dtype == np.uint8
    n_distractors = []
    for image, geom, label in zip(images, geoms, labels, strict=True):
        assert geom["label"] == label
        check_geometry(image, geom, params)
        n_distractors.append(len(set(geom["path"][(geom["path"] >= 2) & (geom["path"] < 1000)])))
        assert (geom["path"] >= 1000).sum() > 0  # single paddles fill the space
    assert max(n_distractors) >= 1


def test_sampled_images_have_the_task_geometry_128():
    params = PathfinderParams.preset(128)
    images, geoms = sample_pathfinder(params, [1, 0, 1], np.random.default_rng(2))
    assert images.shape == (3, 128, 128)
    for image, geom in zip(images, geoms, strict=True):
        check_geometry(image, geom, params)


def test_sampler_rejects_bad_labels_and_params():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        sample_pathfinder(PathfinderParams(), [0, 2], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"PathfinderParams.margins must be .* got \(\)"):
        PathfinderParams(margins=())
    with pytest.raises(ValueError, match="size must be 32 or 128"):
        PathfinderParams.preset(64)


def test_generate_writes_release_layout_balanced_and_seeded(tmp_path):
    out = generate_pathfinder(tmp_path / "a", size=32, count=30, seed=4, images_per_batch=12,
                              progress=False)
    root = out["root"]
    assert [p.name for p in out["metadata"]] == ["0.npy", "1.npy", "2.npy"]
    lines = [ln for p in out["metadata"] for ln in p.read_text().splitlines()]
    assert len(lines) == 30
    labels = []
    for n, line in enumerate(lines):
        fields = line.split(" ")
        batch, i = divmod(n, 12)
        assert fields[:3] == [f"imgs/{batch}", f"sample_{i}.png", str(i)]
        assert (root / fields[0] / fields[1]).is_file()
        labels.append(int(fields[3]))
    assert sorted(labels) == [0] * 15 + [1] * 15

    again = generate_pathfinder(tmp_path / "b", size=32, count=30, seed=4, images_per_batch=12,
                                progress=False)["root"]
    other = generate_pathfinder(tmp_path / "c", size=32, count=30, seed=5, images_per_batch=12,
                                progress=False)["root"]
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) == 33
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((root / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_loader_round_trips_generated_images(tmp_path):
    out = generate_pathfinder(tmp_path, size=32, count=10, seed=9, progress=False)
    ds = PathfinderDataset(out["root"])
    assert len(ds) == 10 and ds.size == 32
    labels = np.random.default_rng(9).permutation(np.arange(10) % 2)
    params = PathfinderParams.preset(32)
    images, _ = sample_pathfinder(params, labels, np.random.default_rng([9, 0]))
    for n in range(10):
        item = ds[n]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (1024,)
        assert item["input_ids"].tolist() == images[n].reshape(-1).tolist()
        assert int(item["labels"]) == labels[n]


# --- loader on hand-written release-format fixtures -----------------------------------------------


def write_release(root, n=6, size=8, binary_meta=False):
    rows = []
    for i in range(n):
        img = ((np.arange(size * size).reshape(size, size) * 3 + i) % 256).astype(np.uint8)
        (root / "imgs" / "0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "imgs" / "0" / f"sample_{i}.png")
        rows.append(["imgs/0", f"sample_{i}.png", str(i), str(i % 2), "1.0", "14", "4", "2",
                     "0.5", "1", "1"])
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    if binary_meta:
        np.save(root / "metadata" / "0.npy", np.array(rows))
    else:
        (root / "metadata" / "0.npy").write_text("\n".join(" ".join(r) for r in rows) + "\n")


@pytest.mark.parametrize("binary_meta", [False, True])
def test_loader_reads_release_layout_in_raster_order(tmp_path, binary_meta):
    write_release(tmp_path, binary_meta=binary_meta)
    ds = PathfinderDataset(tmp_path)
    assert len(ds) == 6 and ds.size == 8
    for i in range(6):
        expected = [(k * 3 + i) % 256 for k in range(64)]  # pixel (r, c) is step r * 8 + c
        assert ds[i]["input_ids"].tolist() == expected
        assert int(ds[i]["labels"]) == i % 2


def test_loader_splits_partition_the_data(tmp_path):
    write_release(tmp_path, n=20)
    parts = [PathfinderDataset(tmp_path, split=s).paths for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [16, 2, 2]
    few = tmp_path / "few"
    write_release(few, n=5)  # 80 / 10 / 10 of 5 images: val rounds to none
    with pytest.raises(ValueError, match=r"split='val' gets no image: 5 images"):
        PathfinderDataset(few, split="val", size=32)
    assert sorted(sum(parts, [])) == sorted(PathfinderDataset(tmp_path).paths)
    with pytest.raises(ValueError, match="split must be one of"):
        PathfinderDataset(tmp_path, split="dev")


def test_loader_errors_name_the_problem(tmp_path):
    expected = r"missing does not exist; expected layout: <root>/metadata"
    with pytest.raises(FileNotFoundError, match=expected):
        PathfinderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/metadata does not exist"):
        PathfinderDataset(tmp_path / "empty")

    root = tmp_path / "r"
    write_release(root)
    (root / "imgs" / "0" / "sample_2.png").unlink()
    (root / "imgs" / "0" / "sample_3.png").write_bytes(b"\x89PNG not really")
    ds = PathfinderDataset(root)
    with pytest.raises(FileNotFoundError, match=r"sample_2.png does not exist"):
        ds[2]
    with pytest.raises(CorruptFileError, match=r"sample_3.png: cannot decode image"):
        ds[3]
    with pytest.raises(CorruptFileError, match=r"image is 8x8, expected 32x32"):
        PathfinderDataset(root, size=32)[0]

    (root / "metadata" / "1.npy").write_text("imgs/0 sample_0.png 0\n")
    with pytest.raises(CorruptFileError, match=r"1.npy:1: expected 'imgs/<batch> sample_<i>.png"):
        PathfinderDataset(root)


def test_missing_pillow_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install spadeformer\[data\]"):
        import_pil()


def test_preset_matches_release_parameters():
    p32, p128 = PathfinderParams.preset(32), PathfinderParams.preset(128)
    assert (p32.size, p32.contour_length, p32.paddle_length) == (32, 14, 2)
    assert (p32.paddle_thickness, p32.margins, p32.continuity) == (0.5, (1,), 1.0)
    assert (p32.seed_distance, p32.marker_radius) == (7, 1.5)
    assert (p32.distractor_length, p32.n_distractors) == (14 // 3, 20 // (14 // 3))
    assert (p128.size, p128.contour_length, p128.paddle_thickness) == (128, 14, 1.5)
    assert p128.margins == (2, 3)
    assert (p128.continuity, p128.seed_distance, p128.marker_radius) == (1.8, 20, 3)
    assert p128.n_distractors == math.ceil(35 / (14 / 3))


def test_an_existing_data_set_is_refused_or_replaced_whole(tmp_path):
    generate_pathfinder(tmp_path, size=32, count=6, seed=1, images_per_batch=2, progress=False)
    with pytest.raises(FileExistsError, match=r"already holds a data set \(imgs/, metadata/\)"):
        generate_pathfinder(tmp_path, size=32, count=2, seed=2, progress=False)
    assert len(list((tmp_path / "imgs").rglob("*.png"))) == 6  # untouched
    generate_pathfinder(tmp_path, size=32, count=2, seed=2, images_per_batch=2, progress=False,
                        overwrite=True)
    assert len(list((tmp_path / "imgs").rglob("*.png"))) == 2  # no stale images left
    assert [p.name for p in (tmp_path / "metadata").iterdir()] == ["0.npy"]


def test_an_interrupted_overwrite_leaves_the_old_data_set(tmp_path, monkeypatch):
    import spadeformer.data.pathfinder as pf

    generate_pathfinder(tmp_path, size=32, count=4, seed=1, images_per_batch=2, progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pf, "sample_pathfinder", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_pathfinder(tmp_path, size=32, count=2, seed=2, progress=False, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
