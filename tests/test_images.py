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


def test_draft_decodes_large_jpeg_at_reduced_scale(tmp_path):
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(tmp_path / "large.jpg")
    d = decode_image(str(tmp_path / "large.jpg"), draft_size=256)
    assert (d.width, d.height) == (2000, 1500)  # the original size is reported
    assert 256 <= min(d.image.size) < 750  # decoded at 1/4 scale
