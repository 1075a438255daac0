"""Image input for ViT: decoding (Pillow, or .npy without it), Pillow-exact bilinear resize, preprocessing."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from radial_min.io import images
from conftest import shared
from radial_min.errors import RadialError

FIXTURES = Path(__file__).parent / "fixtures"


def pil():
    return pytest.importorskip("PIL.Image")


def photo(name):
    return shared("images", name)


def pillow_resize(a, height, width):
    """Pillow's bilinear resize as ViTImageProcessor calls it (no reducing_gap), per channel for float input."""
    Image = pil()
    if a.dtype == np.uint8:
        return np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR, reducing_gap=None))
    chans = [Image.fromarray(a[:, :, c].astype(np.float32), mode="F") for c in range(a.shape[2])]
    return np.stack([np.asarray(ch.resize((width, height), Image.BILINEAR, reducing_gap=None)) for ch in chans], axis=2)


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg"])
def test_read_png_and_jpeg_like_pillow(name):
    Image = pil()
    path = photo(name)
    ours = images.read_image(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
        size = im.size
    assert ours.dtype == np.uint8 and ours.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(ours, expected)


def test_read_grayscale_png():
    Image = pil()
    path = photo("brick.png")
    with Image.open(path) as im:
        assert im.mode == "L"
        expected = np.asarray(im.convert("RGB"))
        gray = np.asarray(im)
    ours = images.read_image(path)
    assert ours.shape == gray.shape + (3,)
    np.testing.assert_array_equal(ours, expected)
    for c in range(3):
        np.testing.assert_array_equal(ours[:, :, c], gray)


def test_read_rgba_png_drops_alpha(tmp_path):
    Image = pil()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    ours = images.read_image(path)
    np.testing.assert_array_equal(ours, Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(ours, rgba[:, :, :3])


def test_read_uppercase_suffix_and_unreadable_image(tmp_path):
    Image = pil()
    path = tmp_path / "PHOTO.PNG"
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(path, format="PNG")
    assert images.read_image(path).shape == (4, 5, 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(RadialError, match="broken.jpg: not a readable image"):
        images.read_image(bad)


def save_npy(tmp_path, name, a):
    path = tmp_path / name
    np.save(path, a)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_read_npy_layouts(tmp_path, dtype):
    rng = np.random.default_rng(1)
    base = (rng.random((6, 9, 4)) * 255).astype(dtype)
    cases = {
        "hw.npy": (base[:, :, 0], np.repeat(base[:, :, :1], 3, axis=2)),
        "hw1.npy": (base[:, :, :1], np.repeat(base[:, :, :1], 3, axis=2)),
        "hwc.npy": (base[:, :, :3], base[:, :, :3]),
        "hwc4.npy": (base, base[:, :, :3]),
    }
    for name, (stored, expected) in cases.items():
        got = images.read_image(save_npy(tmp_path, name, stored))
        assert got.shape == (6, 9, 3) and got.dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 2), np.uint8),
        np.zeros(7, np.uint8),
        np.zeros((2, 3, 4, 3), np.uint8),
        np.zeros((4, 4), bool),
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 4, 3), np.complex64),
    ],
    ids=["2-channels", "1-d", "4-d", "bool", "empty", "complex"],
)
def test_read_npy_rejects_non_images(tmp_path, array):
    with pytest.raises(RadialError, match=r"expected an \[H, W\], \[H, W, 3\] or \[H, W, 4\] image"):
        images.read_image(save_npy(tmp_path, "x.npy", array))


@pytest.mark.parametrize(
    "content", [b"", b"\x93NUMPY\x01\x00v\x00{'descr'", b"hello, not numpy"], ids=["empty", "truncated", "junk"]
)
def test_read_npy_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(RadialError) as e:
        images.read_image(path)
    assert str(e.value).startswith(f"{path}: not a readable .npy array") and "\n" not in str(e.value)


def test_read_npy_object_array_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RadialError, match="not a readable .npy array"):
        images.read_image(path)


def test_missing_image_file(tmp_path):
    with pytest.raises(RadialError, match="no such image file"):
        images.read_image(tmp_path / "nope.png")


def test_without_pillow_npy_works_and_png_says_what_to_install(tmp_path, monkeypatch):
    Image = pil()
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    a = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    npy = save_npy(tmp_path, "a.npy", a)
    expected = images.preprocess(a, {**images.read_preprocessor(tmp_path, 4)})

    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError):
        import PIL.Image  # noqa: F401
    with pytest.raises(RadialError) as e:
        images.read_image(png)
    msg = str(e.value)
    assert "\n" not in msg and "Pillow" in msg and str(png) in msg and ".npy" in msg
    got = images.read_image(npy)
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(images.preprocess(got, images.read_preprocessor(tmp_path, 4)), expected)


# ------------------------------------------------------------------------------------------------ resize

RESIZES = [
    ((48, 64), (32, 32)),  # down, both axes, horizontal pass first
    ((451, 300), (224, 224)),  # down; the height shrinks by > 2x the width's pixels: Pillow 13 goes vertical first
    ((100, 80), (37, 200)),  # down in height, up in width: vertical first
    ((30, 17), (64, 90)),  # up, both axes
    ((17, 30), (90, 64)),
    ((50, 90), (20, 75)),  # just past the order boundary: 30 > 2 * 15
    ((50, 90), (20, 74)),  # just short of it: 30 > 2 * 16 is false
    ((60, 60), (59, 64)),
    ((9, 4), (1, 1)),
    ((7, 5), (7, 5)),  # same size: unchanged
    ((40, 33), (40, 16)),  # one axis only
    ((33, 40), (16, 40)),
]


def pass_order_matters_in_this_pillow():
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


@pytest.mark.parametrize("src,dst", RESIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in RESIZES])
def test_resize_uint8_is_bit_identical_to_pillow(src, dst):
    pil()
    if not pass_order_matters_in_this_pillow():
        pytest.skip("Pillow < 13 always resizes horizontally first; we follow Pillow 13")
    rng = np.random.default_rng(hash(src + dst) % 2**32)
    a = rng.integers(0, 256, src + (3,), dtype=np.uint8)
    ours = images.resize(a, *dst)
    assert ours.dtype == np.uint8 and ours.shape == dst + (3,)
    np.testing.assert_array_equal(ours, pillow_resize(a, *dst))


def test_resize_random_sizes_match_pillow():
    """Many random shapes, including the neighbourhood of Pillow's pass-order rule, in one quick sweep."""
    pil()
    if not pass_order_matters_in_this_pillow():
        pytest.skip("Pillow < 13 always resizes horizontally first; we follow Pillow 13")
    rng = np.random.default_rng(7)
    bad = []
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(2, 60, 2))
        height = int(rng.integers(1, 2 * h))
        width = (
            max(1, w - (h - height) // 2 + int(rng.integers(-2, 3)))
            if rng.random() < 0.5
            else int(rng.integers(1, 2 * w))
        )
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if not np.array_equal(images.resize(a, height, width), pillow_resize(a, height, width)):
            bad.append((h, w, height, width))
    assert bad == []


@pytest.mark.parametrize("name,size", [("chelsea.png", (224, 224)), ("coffee.png", (32, 32)), ("brick.png", (50, 300))])
@pytest.mark.slow
def test_resize_photos_like_pillow(name, size):
    pil()  # the photos are PNGs
    a = images.read_image(photo(name))
    np.testing.assert_array_equal(images.resize(a, *size), pillow_resize(a, *size))


@pytest.mark.parametrize(
    "src,dst", [((48, 64), (32, 32)), ((451, 300), (224, 224)), ((30, 17), (64, 90)), ((20, 40), (20, 13))]
)
def test_resize_float_matches_pillow_float_mode(src, dst):
    pil()
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 255, src + (3,)).astype(np.float32)
    ours = images.resize(a, *dst)
    assert ours.dtype.kind == "f" and ours.shape == dst + (3,)
    np.testing.assert_allclose(ours, pillow_resize(a, *dst), atol=1e-4, rtol=0)


def test_resize_keeps_constant_images_and_value_range():
    a = np.full((37, 53, 3), 200, np.uint8)
    np.testing.assert_array_equal(images.resize(a, 11, 90), np.full((11, 90, 3), 200, np.uint8))
    b = np.zeros((20, 20, 3), np.uint8)
    b[::2] = 255
    r = images.resize(b, 7, 33)
    assert r.min() >= 0 and r.max() <= 255 and 0 < r.mean() < 255


# ------------------------------------------------------------------------------------------------ preprocessing


def test_read_preprocessor_defaults(tmp_path):
    s = images.read_preprocessor(tmp_path, 48)
    assert s["size"] == (48, 48)
    assert (s["do_resize"], s["do_rescale"], s["do_normalize"]) == (True, True, True)
    assert s["rescale_factor"] == pytest.approx(1 / 255)
    np.testing.assert_array_equal(s["mean"], np.float32([0.5, 0.5, 0.5]))
    np.testing.assert_array_equal(s["std"], np.float32([0.5, 0.5, 0.5]))
    assert s["mean"].dtype == np.float32 and s["std"].dtype == np.float32


@pytest.mark.parametrize(
    "size,expected",
    [({"height": 40, "width": 24}, (40, 24)), (20, (20, 20)), ({"height": 12}, (12, 32)), ([8, 9], (8, 9))],
)
def test_read_preprocessor_size_forms(tmp_path, size, expected):
    config = {"size": size, "image_mean": [0.1, 0.2, 0.3], "do_normalize": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    s = images.read_preprocessor(tmp_path, 32)
    assert s["size"] == expected
    assert s["do_normalize"] is False
    np.testing.assert_allclose(s["mean"], [0.1, 0.2, 0.3])


def test_read_preprocessor_of_the_fixture():
    s = images.read_preprocessor(FIXTURES / "vit-cls", 32)
    d = json.loads((FIXTURES / "vit-cls" / "preprocessor_config.json").read_text())
    assert s["size"] == (d["size"]["height"], d["size"]["width"])
    np.testing.assert_allclose(s["mean"], d["image_mean"])


def test_read_preprocessor_bad_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(RadialError, match="preprocessor_config.json: not valid JSON"):
        images.read_preprocessor(tmp_path, 32)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(RadialError, match="preprocessor_config.json: expected a JSON object"):
        images.read_preprocessor(tmp_path, 32)


def test_preprocess_shape_dtype_and_values(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    s = images.read_preprocessor(tmp_path, 32)
    s["mean"], s["std"] = np.float32([0.4, 0.5, 0.6]), np.float32([0.2, 0.25, 0.5])
    x = images.preprocess(a, s)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    manual = (images.resize(a, 32, 32).astype(np.float32) / 255 - s["mean"]) / s["std"]
    np.testing.assert_allclose(x, manual.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_preprocess_range_and_switches(tmp_path):
    s = images.read_preprocessor(tmp_path, 8)
    white, black = np.full((10, 10, 3), 255, np.uint8), np.zeros((10, 10, 3), np.uint8)
    np.testing.assert_allclose(images.preprocess(white, s), 1.0, atol=1e-6)
    np.testing.assert_allclose(images.preprocess(black, s), -1.0, atol=1e-6)
    s.update(do_resize=False, do_normalize=False)
    x = images.preprocess(white, s)
    assert x.shape == (3, 10, 10)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)
    s.update(do_rescale=False)
    np.testing.assert_array_equal(images.preprocess(white, s), np.full((3, 10, 10), 255, np.float32))


def test_preprocess_photo_through_pillow_matches_our_pipeline():
    """A real photo: our resize is Pillow's, so preprocess equals Pillow-resized pixels, rescaled and normalized."""
    pil()
    a = images.read_image(photo("rocket.jpg"))
    s = images.read_preprocessor(FIXTURES / "vit-cls", 32)
    expected = (pillow_resize(a, 32, 32).astype(np.float32) * np.float32(1 / 255) - 0.5) / 0.5
    np.testing.assert_allclose(images.preprocess(a, s), expected.transpose(2, 0, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------ listing


def test_list_images_folder(tmp_path):
    for name in ["b.png", "a.JPG", "c.npy", "notes.txt", "d.webp", "e"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder is not an image, whatever its name
    files = images.list_images(tmp_path)
    assert [p.name for p in files] == ["a.JPG", "b.png", "c.npy", "d.webp"]
    assert all(p.parent == tmp_path for p in files)


def test_list_images_single_file_missing_and_empty(tmp_path):
    f = tmp_path / "one.npy"
    np.save(f, np.zeros((2, 2), np.uint8))
    assert images.list_images(f) == [f]
    with pytest.raises(RadialError, match="no such image file or folder"):
        images.list_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadialError, match=f"{empty}: no image files"):
        images.list_images(empty)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(RadialError, match="no image files"):
        images.list_images(empty)
