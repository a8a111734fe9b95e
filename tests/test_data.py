"""imgcluster.data: scanning, the loader policy for awkward files, resizing and the decode cache."""

import os
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from imgcluster import data
from imgcluster.data import BadImage, DataError, load_image, load_image_set, resize_square, scan_folder


def save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(color, size=(8, 6)):
    return Image.new("RGB", size, color)


def noise(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def write(path, blob):
    path.write_bytes(blob)
    return path


def truncated(path, img, fmt):
    img.save(path, fmt)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


# ---------------------------------------------------------------------------------------------
# scan_folder
# ---------------------------------------------------------------------------------------------

def test_scan_is_sorted_recursive_and_skips_hidden(tmp_path):
    for rel in ["b.png", "a/c.png", "a/z/d.png", "a/.hidden.png", ".git/x.png", "labels.csv", "a b.png"]:
        save(tmp_path / rel, rgb("red"), format="PNG")
    assert scan_folder(tmp_path) == ["a b.png", "a/c.png", "a/z/d.png", "b.png", "labels.csv"]
    assert scan_folder(str(tmp_path)) == scan_folder(tmp_path)


def test_scan_survives_symlink_loop_and_lists_file_links(tmp_path):
    root = tmp_path / "data"
    save(root / "sub" / "a.png", rgb("red"))
    os.symlink(root, root / "sub" / "loop")                     # directory link to an ancestor: not followed
    os.symlink(root / "sub" / "a.png", root / "link.png")       # file link: listed
    os.symlink(root / "gone.png", root / "dangling.png")        # dangling: listed, reported as unreadable later
    os.mkfifo(root / "pipe.png")                                # would block if opened: skipped
    assert scan_folder(root) == ["dangling.png", "link.png", "sub/a.png"]
    with pytest.raises(BadImage, match="unreadable"):
        load_image(root / "dangling.png")


def test_scan_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing: no such folder"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        scan_folder(tmp_path / "f.png")
    assert scan_folder(tmp_path / ".") == ["f.png"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that takes arbitrary bytes")
def test_non_utf8_name_round_trips(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    save(tmp_path / name, rgb("blue"), format="PNG")
    files = scan_folder(tmp_path)
    assert files == [name]
    assert load_image(tmp_path / files[0]).getpixel((0, 0)) == (0, 0, 255)
    s = load_image_set(tmp_path, 4, cache_dir=tmp_path / ".cache")
    assert s.files == [name] and s.ok.all()


# ---------------------------------------------------------------------------------------------
# load_image: every mode to 8-bit RGB
# ---------------------------------------------------------------------------------------------

def palette_with_transparency():
    img = Image.new("P", (5, 3), 0)
    img.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0           # index 0 (red) is transparent
    return img


@pytest.mark.parametrize("name, make, fmt, expect", [
    ("grey.png", lambda: Image.new("L", (5, 3), 100), "PNG", (100, 100, 100)),
    ("bw.png", lambda: Image.new("1", (5, 3), 1), "PNG", (255, 255, 255)),
    ("pal.png", palette_with_transparency, "PNG", (255, 255, 255)),
    ("pal.gif", palette_with_transparency, "GIF", (255, 255, 255)),
    ("rgba.png", lambda: Image.new("RGBA", (5, 3), (255, 0, 0, 0)), "PNG", (255, 255, 255)),
    ("half.png", lambda: Image.new("RGBA", (5, 3), (0, 0, 0, 128)), "PNG", (127, 127, 127)),
    ("la.png", lambda: Image.new("LA", (5, 3), (0, 0)), "PNG", (255, 255, 255)),
    ("cmyk.jpg", lambda: Image.new("CMYK", (5, 3), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    ("grey16.png", lambda: Image.fromarray(np.full((3, 5), 32768, np.uint16)), "PNG", (128, 128, 128)),
    ("white16.png", lambda: Image.fromarray(np.full((3, 5), 65535, np.uint16)), "PNG", (255, 255, 255)),
    ("float.tif", lambda: Image.fromarray(np.full((3, 5), 0.5, np.float32)), "TIFF", (128, 128, 128)),
    ("ycbcr.jpg", lambda: rgb((0, 0, 255), (5, 3)).convert("YCbCr"), "JPEG", (0, 0, 254)),
    ("photo.webp", lambda: rgb((0, 200, 0), (5, 3)), "WEBP", (0, 200, 0)),
])
def test_every_mode_becomes_8bit_rgb(tmp_path, name, make, fmt, expect):
    path = save(tmp_path / name, make(), format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    got = np.asarray(img)[0, 0].astype(int)
    assert np.abs(got - expect).max() <= 3, (name, got)


def test_palette_opaque_pixel_survives(tmp_path):
    img = load_image(save(tmp_path / "p.png", palette_with_transparency()))
    assert img.getpixel((1, 1)) == (0, 255, 0) and img.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = noise(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6                          # "rotate 90 CW to display"
    path = save(tmp_path / "rot.jpg", img, format="JPEG", exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [rgb((255, 0, 0), (6, 6)), rgb((0, 0, 255), (6, 6))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    assert load_image(path).getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("setup, reason", [
    (lambda p: truncated(p / "t.jpg", noise(), "JPEG"), "truncated file"),
    (lambda p: truncated(p / "t.png", noise(), "PNG"), "truncated file"),
    (lambda p: write(p / "empty.png", b""), "zero-byte file"),
    (lambda p: write(p / "text.jpg", b"hello, not a picture\n"), "not an image"),
    (lambda p: p / "vanished.png", "unreadable: No such file or directory"),
])
def test_bad_files_raise_bad_image_with_a_short_reason(tmp_path, setup, reason):
    with pytest.raises(BadImage) as info:
        load_image(setup(tmp_path))
    assert str(info.value) == reason


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", noise(20, 20))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(BadImage, match=r"decompression bomb: 20x20 .*limit of 100"):
        load_image(path, max_pixels=100)


def test_pillow_hard_limit_is_reported_as_a_bomb(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", noise(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # Pillow itself refuses above 2x this
    with pytest.raises(BadImage, match=r"decompression bomb: 400 pixels exceeds limit of 200"):
        load_image(path, max_pixels=None)


def test_no_pillow_warning_escapes(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", noise(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)     # 400 px: Pillow warns, we allow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (20, 20)


# ---------------------------------------------------------------------------------------------
# resize_square
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w, h", [(1, 1), (1, 40), (40, 1), (64, 48), (7, 300)])
def test_resize_square_any_aspect(w, h):
    out = resize_square(noise(w, h), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_resize_square_centre_crops_the_long_side():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))    # blue middle third
    out = resize_square(img, 8)
    assert (out[:, 2:6] == [0, 0, 255]).all()


def photo(w, h, seed=0):
    """A photo-like picture: smooth colour fields, a few sharp-edged shapes, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - w // 4), rng.integers(0, h - h // 4)
        img[y0:y0 + h // 5, x0:x0 + w // 5] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_large_jpeg_is_decoded_at_reduced_scale_with_nearly_the_same_pixels(tmp_path):
    path = save(tmp_path / "big.jpg", photo(1200, 900), format="JPEG", quality=90)
    assert load_image(path).size == (1200, 900)
    drafted = load_image(path, draft_side=128)
    assert drafted.size == (300, 225)              # 1/4: both sides still >= 128 (1/8 would leave 112)
    full = resize_square(load_image(path), 32).astype(int)
    assert np.abs(resize_square(drafted, 32).astype(int) - full).mean() < 1.0
    # the cache decodes that way: a JPEG DRAFT_MARGIN times the cached side or more
    cached = load_image_set(tmp_path, 32, cache_dir=tmp_path / "cache", workers=1).images[0]
    assert np.array_equal(cached, resize_square(load_image(path, draft_side=data.DRAFT_MARGIN * 32), 32))
    assert not np.array_equal(cached, full)


@pytest.mark.parametrize("name, fmt", [("small.jpg", "JPEG"), ("big.png", "PNG")])
def test_small_jpegs_and_other_formats_are_decoded_in_full(tmp_path, name, fmt):
    size = (200, 150) if fmt == "JPEG" else (1200, 900)   # JPEG: 1/2 would leave 75 < 128
    path = save(tmp_path / name, photo(*size), format=fmt)
    assert load_image(path, draft_side=128).size == size


# ---------------------------------------------------------------------------------------------
# load_image_set and the cache
# ---------------------------------------------------------------------------------------------

def make_folder(root):
    save(root / "a.png", rgb((255, 0, 0), (20, 10)))
    save(root / "sub" / "b.jpg", noise(30, 30), format="JPEG")
    save(root / "c.gif", palette_with_transparency())
    (root / "labels.csv").write_text("path,label\na.png,0\n")
    truncated(root / "d.jpg", noise(), "JPEG")
    (root / "e.png").write_bytes(b"")
    return root


def test_load_image_set_shapes_flags_and_reasons(tmp_path):
    s = load_image_set(make_folder(tmp_path / "data"), 8, cache_dir=tmp_path / "cache")
    assert s.files == ["a.png", "c.gif", "d.jpg", "e.png", "labels.csv", "sub/b.jpg"]
    assert s.images.shape == (6, 8, 8, 3) and s.images.dtype == np.uint8
    assert isinstance(s.images, np.memmap) and not s.images.flags.writeable
    assert s.ok.tolist() == [True, True, False, False, False, True]
    assert s.good_indices.tolist() == [0, 1, 5]
    assert s.reasons == ["", "", "truncated file", "zero-byte file", "not an image", ""]
    assert s.bad() == [("d.jpg", "truncated file"), ("e.png", "zero-byte file"), ("labels.csv", "not an image")]
    assert (s.images[0] == [255, 0, 0]).all()
    assert not s.images[[2, 3, 4]].any()                  # bad rows are zeros
    assert s.images[5].std() > 10                         # the noise image is there


def test_second_call_hits_the_cache(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    first = load_image_set(root, 8, cache_dir=tmp_path / "cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]
    monkeypatch.setattr(data, "load_image", lambda *a, **k: pytest.fail("cache was rebuilt"))
    seen = []
    again = load_image_set(root, 8, cache_dir=tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    assert np.array_equal(first.images, again.images) and again.reasons == first.reasons
    assert seen[-1] == (6, 6)


def test_cache_is_invalidated_by_changes(tmp_path):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    load_image_set(root, 8, cache_dir=cache)
    save(root / "new.png", rgb((0, 255, 0)))
    s = load_image_set(root, 8, cache_dir=cache)
    assert "new.png" in s.files and s.ok[s.files.index("new.png")]
    os.utime(root / "a.png", ns=(1, 1))                  # same name and size, different mtime
    save(root / "a.png", rgb((0, 0, 255), (20, 10)))
    s = load_image_set(root, 8, cache_dir=cache)
    assert (s.images[0] == [0, 0, 255]).all()
    assert load_image_set(root, 4, cache_dir=cache).images.shape[1:] == (4, 4, 3)   # size is in the key


def test_interrupted_build_leaves_nothing_trusted(tmp_path):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"

    def boom(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_image_set(root, 8, cache_dir=cache, progress=boom)
    assert list(cache.iterdir()) == []                     # no .npy, no .json, no temp file
    assert load_image_set(root, 8, cache_dir=cache).ok.sum() == 3


def test_truncated_cache_file_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    load_image_set(root, 8, cache_dir=cache)
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:100])
    assert load_image_set(root, 8, cache_dir=cache).images.shape == (6, 8, 8, 3)


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    root = make_folder(tmp_path / "data")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    s = load_image_set(root, 8, cache_dir=blocker)
    assert s.images.shape == (6, 8, 8, 3) and s.ok.sum() == 3 and not s.images.flags.writeable


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DataError, match="no files"):
        load_image_set(tmp_path / "data", 8, cache_dir=tmp_path / "cache")


def test_write_bad_images(tmp_path):
    s = load_image_set(make_folder(tmp_path / "data"), 8, cache_dir=tmp_path / "cache")
    out = tmp_path / "bad_images.csv"
    assert data.write_bad_images(out, s) == 3
    lines = out.read_text().splitlines()
    assert lines[0] == "path,reason" and len(lines) == 4 and lines[1] == "d.jpg,truncated file"
    good = load_image_set(tmp_path / "data" / "sub", 8, cache_dir=tmp_path / "cache")
    assert data.write_bad_images(out, good) == 0 and out.read_text().splitlines() == ["path,reason"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IMGCLUSTER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x" / "imgcluster"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir().parts[-2:] == (".cache", "imgcluster")


def test_parallel_decoding_matches_sequential(tmp_path, caplog, monkeypatch):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for i in range(600):
        save(root / f"{i // 100}" / f"{i:04d}.png", Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)))
    (root / "3" / "0350.png").write_bytes(b"junk")
    progress = []
    t = time.perf_counter()
    par = load_image_set(root, 4, cache_dir=tmp_path / "c2", workers=2, progress=lambda d, n: progress.append(d))
    assert time.perf_counter() - t < 15
    seq = load_image_set(root, 4, cache_dir=tmp_path / "c1", workers=1)
    assert np.array_equal(par.images, seq.images) and par.reasons == seq.reasons
    assert par.ok.sum() == 599 and par.reasons[350] == "not an image"
    assert progress[0] == 0 and progress[-1] == 600 and progress == sorted(progress)
    assert 2 < len(progress) < 600                        # whole chunks came back from the workers
    assert not caplog.records                             # no fallback warning: the pool really ran

    def no_processes(*args, **kwargs):
        raise OSError(38, "Function not implemented")    # e.g. no /dev/shm for semaphores

    monkeypatch.setattr(data, "ProcessPoolExecutor", no_processes)
    fallback = load_image_set(root, 4, cache_dir=tmp_path / "c3", workers=2)
    assert np.array_equal(fallback.images, seq.images) and "one process" in caplog.text
