import io
import os

import numpy as np
import pytest
from PIL import Image

from embedx.errors import InputError
from embedx.images import ImageDecodeError, decode_image, list_images


def test_list_directory_sorted_with_folder_labels(tiny_dir):
    listing = list_images([tiny_dir])
    paths = [r.path for r in listing.records]
    assert paths == sorted(paths) and len(paths) == 24
    assert [r.row_id for r in listing.records] == list(range(24))
    assert {r.label for r in listing.records} == {"class_0", "class_1", "class_2"}
    assert all(r.label == r.path.split("/")[0] for r in listing.records)
    assert listing.root == str(tiny_dir.resolve())
    assert all(os.path.isabs(r.file) for r in listing.records)
    assert {r.label for r in list_images([tiny_dir], labels="none").records} == {None}


def test_list_files_txt_csv_parquet(tiny_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))[:5]
    (tmp_path / "l.txt").write_text("\n".join(files) + "\n")
    (tmp_path / "l.csv").write_text("path,label\n" + "\n".join(f"{f},x{i}" for i, f in enumerate(files)))
    pq.write_table(pa.table({"path": files}), tmp_path / "l.parquet")
    for name in ("l.txt", "l.csv", "l.parquet"):
        recs = list_images([tmp_path / name]).records
        assert [r.path for r in recs] == files  # absolute for list files
    assert [r.label for r in list_images([tmp_path / "l.csv"]).records] == [f"x{i}" for i in range(5)]


def test_list_files_from_spreadsheets_and_notepad(tiny_dir, tmp_path):
    """A byte-order mark (Excel's "CSV UTF-8", Notepad), CRLF line ends, a header written
    "Path, Label" and a blank row: read as meant, not as a missing 'path' column or a first
    path that starts with U+FEFF."""
    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))[:3]
    bom = b"\xef\xbb\xbf"
    (tmp_path / "excel.csv").write_bytes(bom + ("Path, Label\r\n" + "".join(f"{f}, x{i}\r\n" for i, f in enumerate(files))
                                                + ",\r\n").encode())
    (tmp_path / "notepad.txt").write_bytes(bom + "\r\n".join(files).encode() + b"\r\n")
    recs = list_images([tmp_path / "excel.csv"]).records
    assert [(r.path, r.label) for r in recs] == [(f, f"x{i}") for i, f in enumerate(files)]
    assert [r.path for r in list_images([tmp_path / "notepad.txt"]).records] == files
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(InputError, match="needs a 'path' column .*its header: file, label"):
        list_images([tmp_path / "bad.csv"])


def test_relative_paths_in_list_file_resolve_against_it(tiny_dir, tmp_path):
    (tiny_dir / "rel.txt").write_text("class_0/img_000.png\n")
    try:
        rec = list_images([tiny_dir / "rel.txt"]).records[0]
        assert rec.file == str(tiny_dir / "class_0" / "img_000.png")
    finally:
        (tiny_dir / "rel.txt").unlink()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No images found"):
        list_images([tmp_path / "empty"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match=".txt, .csv or .parquet"):
        list_images([tmp_path / "x.json"])


def test_listing_counts_the_files_it_leaves_out(tmp_path):
    from embedx.images import describe_ignored

    arr = np.zeros((8, 8, 3), np.uint8)
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    Image.fromarray(arr).save(tmp_path / "a.JPG")
    Image.fromarray(arr).save(tmp_path / "sub" / "b.png")
    for name in ("notes.txt", "sub/meta.json", "sub/more.json", "README", ".hidden", ".git/config.txt"):
        (tmp_path / name).write_text("x")
    listing = list_images([tmp_path])
    assert [r.path for r in listing.records] == ["a.JPG", "sub/b.png"]
    # hidden files and folders are not counted; the rest by lower-case extension
    assert listing.ignored == {"": 1, ".json": 2, ".txt": 1}
    assert describe_ignored(listing.ignored) == "4 files (.json: 2, no extension: 1, .txt: 1)"
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "x.txt").write_text("x")
    with pytest.raises(InputError, match=r"No images found.*Left out: 1 file \(\.txt: 1\)"):
        list_images([tmp_path / "only-text"])


@pytest.mark.parametrize("ext, fmt", [(".avif", "AVIF"), (".heic", "HEIF"), (".jpe", "JPEG")])
def test_avif_heic_and_jpe_photos_are_listed_and_decoded(tmp_path, ext, fmt):
    from embedx.demo_data import load_photo

    photo = np.asarray(load_photo("chelsea"))  # real photo, 451 x 300
    if ext == ".heic":
        import pillow_heif  # a dev dependency: `pip install -e ".[dev]"` (or pillow-heif) brings it

        # written without registering the plugin with PIL: decode_image must do that itself
        pillow_heif.from_pillow(Image.fromarray(photo)).save(tmp_path / f"cat{ext}", quality=90)
    else:
        Image.fromarray(photo).save(tmp_path / f"cat{ext}", format=fmt, quality=90)
    rec = list_images([tmp_path]).records
    assert [r.path for r in rec] == [f"cat{ext}"]
    d = decode_image(rec[0].file, as_array=True)
    assert (d.width, d.height) == (451, 300) and d.image.shape == (300, 451, 3)
    assert np.abs(d.image.astype(int) - photo).mean() < 3  # lossy at quality 90, same picture


def test_heic_without_its_plugin_is_an_error_that_says_what_to_install(tmp_path, monkeypatch):
    import embedx.images

    monkeypatch.setattr(embedx.images, "_heif_problem", lambda: "not installed: No module named 'pillow_heif'")
    (tmp_path / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    with pytest.raises(ImageDecodeError, match="pip install pillow-heif") as e:
        decode_image(str(tmp_path / "phone.HEIC"))
    assert e.value.kind == "unsupported_format"
    # a file PIL can open anyway (a JPEG named .heic) is decoded, plugin or not
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "mislabelled.heic", format="JPEG")
    assert decode_image(str(tmp_path / "mislabelled.heic"), as_array=True).image.shape == (8, 8, 3)


def _one_pixel_jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def test_symlink_loops_are_skipped_and_said_linked_folders_are_walked(tmp_path, caplog):
    root = tmp_path / "imgs"
    _one_pixel_jpeg(root / "cats" / "a.jpg")
    _one_pixel_jpeg(tmp_path / "elsewhere" / "b.jpg")
    (root / "cats" / "up").symlink_to("..")                 # a loop back to imgs/
    (root / "more").symlink_to(tmp_path / "elsewhere")       # a linked folder, no loop
    with caplog.at_level("WARNING", logger="embedx.images"):
        listing = list_images([root])  # before: 41 images (cats/up/cats/up/... until the OS's ELOOP)
    assert [(r.path, r.label) for r in listing.records] == [("cats/a.jpg", "cats"), ("more/b.jpg", "more")]
    assert list(listing.skipped_dirs) == [str(root / "cats" / "up")]
    assert listing.skipped_dirs[str(root / "cats" / "up")].startswith("symlink loop")
    assert "Skipped 1 folder" in caplog.text and "cats/up" in caplog.text


def test_a_loop_through_two_links_is_skipped(tmp_path):
    root = tmp_path / "imgs"
    _one_pixel_jpeg(root / "a.jpg")
    _one_pixel_jpeg(tmp_path / "elsewhere" / "b.jpg")
    (root / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "back").symlink_to(root / "more")  # more -> elsewhere, elsewhere/back -> more
    listing = list_images([root])
    assert [r.path for r in listing.records] == ["a.jpg", "more/b.jpg"]
    assert list(listing.skipped_dirs) == [str(root / "more" / "back")]


def test_unreadable_folders_are_skipped_and_said(tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    _one_pixel_jpeg(root / "ok" / "a.jpg")
    _one_pixel_jpeg(root / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests may run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING", logger="embedx.images"):
        listing = list_images([root])
    assert [r.path for r in listing.records] == ["ok/a.jpg"]
    assert listing.skipped_dirs == {str(root / "locked"): "cannot be read (PermissionError: Permission denied)"}
    assert "locked" in caplog.text and "not in this run" in caplog.text
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", os.fspath(path))))
    with pytest.raises(InputError, match="No images found.*Skipped 1 folder.*cannot be read"):
        list_images([root])


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_decode_modes_to_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    cases = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "grey.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "p.png": rgb.convert("P"),
        "la.png": rgb.convert("LA"),
    }
    for name, img in cases.items():
        d = decode_image(_save(img, tmp_path / name))
        assert d.image.mode == "RGB" and d.image.size == (40, 30), name
        assert (d.width, d.height) == (40, 30)
    # 16-bit greyscale keeps its dynamic range
    arr16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    d = decode_image(_save(Image.fromarray(arr16), tmp_path / "g16.png"))
    px = np.asarray(d.image)
    assert px.dtype == np.uint8 and px.min() == 0 and px.max() == 255
    # palette with a transparent entry composites onto white
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    d = decode_image(_save(pal, tmp_path / "ptrans.png", transparency=0))
    assert np.asarray(d.image).min() == 255


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    px = np.asarray(decode_image(str(path)).image)
    assert px[..., 0].mean() > 200 and px[..., 2].mean() < 50


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    d = decode_image(str(path))
    assert d.image.size == (20, 40) and (d.width, d.height) == (20, 40)
    px = np.asarray(d.image).astype(int)
    assert px[:15, :, 2].mean() > 200  # the blue half is now on top


@pytest.mark.parametrize(
    "name,content,kind",
    [
        ("zero.jpg", b"", "empty"),
        ("text.jpg", b"this is not an image at all", "not_an_image"),
    ],
)
def test_bad_files_raise_decode_error(tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(str(tmp_path / name))
    assert e.value.kind == kind


def test_truncated_missing_and_bomb(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageDecodeError) as e:
        decode_image(str(tmp_path / "trunc.jpg"))
    assert e.value.kind in ("truncated", "decode_error")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(str(tmp_path / "missing.jpg"))
    assert e.value.kind == "missing"
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(str(tmp_path / "big.png"), max_pixels=50_000)
    assert e.value.kind == "too_large" and "--max-pixels" in str(e.value)
    assert decode_image(str(tmp_path / "big.png"), max_pixels=100_000).width == 300


def test_a_low_max_pixels_does_not_leak_into_pil(tmp_path):
    """PIL's bomb limit is process-wide: embedx's own lower limit must not become everyone's."""
    Image.new("RGB", (600, 400)).save(tmp_path / "p.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError):
        decode_image(str(tmp_path / "p.png"), max_pixels=50_000)
    assert Image.MAX_IMAGE_PIXELS == before
    with Image.open(tmp_path / "p.png") as im:  # another PIL user in the process
        im.load()
    assert im.size == (600, 400)


def test_draft_decodes_large_jpeg_at_reduced_scale(tmp_path):
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(tmp_path / "large.jpg")
    d = decode_image(str(tmp_path / "large.jpg"), draft_size=256)
    assert (d.width, d.height) == (2000, 1500)  # the original size is reported
    assert 256 <= min(d.image.size) < 750  # decoded at 1/4 scale


def _jpeg_variants(tmp_path):
    """Real photos saved as the JPEG kinds people have: baseline 4:2:0, 4:4:4, progressive,
    greyscale, odd sizes, small (below any draft target) and large (drafted 1/2, 1/4)."""
    from .conftest import real_photo

    rng = np.random.default_rng(0)
    out = []
    for k, name in enumerate(("chelsea", "coffee", "astronaut", "camera")):
        img = Image.fromarray(real_photo(name))
        w, h = img.size
        variants = {
            "base": (img, {}),
            "444": (img, {"subsampling": 0, "quality": 92}),
            "prog": (img, {"progressive": True}),
            "grey": (img.convert("L"), {}),
            "odd": (img.crop((3, 5, w - int(rng.integers(1, 9)), h - 7)), {}),
            "small": (img.resize((97, 61)), {}),
            "large": (img.resize((w * 4 + 3, h * 4 + 1)), {"quality": 85}),
        }
        for tag, (im, kw) in variants.items():
            path = tmp_path / f"{k}-{tag}.jpg"
            im.save(path, "JPEG", **kw)
            out.append(str(path))
    return out


@pytest.mark.parametrize("draft_size", [None, 512, 150])
def test_array_decode_gives_pils_exact_pixels(tmp_path, draft_size):
    pytest.importorskip("simplejpeg")
    import embedx.images as images

    files = _jpeg_variants(tmp_path)
    for f in files:
        ref = decode_image(f, draft_size=draft_size)
        got = decode_image(f, draft_size=draft_size, as_array=True)
        assert isinstance(got.image, np.ndarray) and got.image.dtype == np.uint8 and got.image.flags.writeable
        assert (got.width, got.height) == (ref.width, ref.height)
        np.testing.assert_array_equal(got.image, np.asarray(ref.image), err_msg=f)
        # the fast path really served it: simplejpeg alone, at PIL's drafted size, gives the same array
        with Image.open(f) as im:
            if draft_size:
                im.draft("RGB", (draft_size, draft_size))
            size = im.size
        with open(f, "rb") as fh:
            direct = images._turbo_decode(fh, size)
        assert direct is not None, f
        np.testing.assert_array_equal(direct, got.image, err_msg=f)
    if draft_size == 150:  # the large ones were decoded at a reduced DCT scale
        big = decode_image(files[-1], draft_size=draft_size, as_array=True)
        assert big.image.shape[1] < big.width // 2


def test_array_decode_falls_back_to_pil_for_what_simplejpeg_declines(tmp_path):
    from .conftest import real_photo

    img = Image.fromarray(real_photo("coffee"))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)  # EXIF rotation: PIL's transpose
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    img.save(tmp_path / "p.png")
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("rot.jpg", "cmyk.jpg", "p.png"):
        ref = decode_image(str(tmp_path / name))
        got = decode_image(str(tmp_path / name), as_array=True)
        np.testing.assert_array_equal(got.image, np.asarray(ref.image), err_msg=name)
    assert decode_image(str(tmp_path / "rot.jpg"), as_array=True).image.shape == (img.width, img.height, 3)
    # a truncated JPEG is declined by simplejpeg (strict) and classified by PIL, as before
    with pytest.raises(ImageDecodeError) as e:
        decode_image(str(tmp_path / "trunc.jpg"), as_array=True)
    assert e.value.kind in ("truncated", "decode_error")


def test_array_decode_without_simplejpeg_says_so_and_uses_pil(tmp_path, monkeypatch, caplog):
    import sys

    import embedx.images as images

    files = _jpeg_variants(tmp_path)[:2]
    monkeypatch.setattr(images, "_simplejpeg", None)
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import now raises ImportError
    with caplog.at_level("WARNING", logger="embedx.images"):
        got = [decode_image(f, as_array=True).image for f in files]
    assert "simplejpeg is not installed" in caplog.text
    for f, g in zip(files, got):
        np.testing.assert_array_equal(g, np.asarray(decode_image(f).image))


def test_use_simplejpeg_switches_the_jpeg_path(tmp_path, monkeypatch):
    sj = pytest.importorskip("simplejpeg")
    import embedx.images as images

    calls = []
    real = sj.decode_jpeg
    monkeypatch.setattr(sj, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(images, "_simplejpeg", None)  # restored after the test
    f = _jpeg_variants(tmp_path)[0]
    images.use_simplejpeg(False)
    off = decode_image(f, as_array=True).image
    assert calls == [] and images.jpeg_decoder() == "PIL"
    images.use_simplejpeg(True)
    on = decode_image(f, as_array=True).image
    assert calls == [1] and images.jpeg_decoder().startswith("simplejpeg ")
    np.testing.assert_array_equal(on, off)
