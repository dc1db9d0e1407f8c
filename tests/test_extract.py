"""extract: synthetic and AFHQ-style sources, bad files, wrong layouts, re-runs."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from steps.extract import SourceError, extract
from tests.conftest import SHARED_SAMPLE


def jpeg(color=(120, 80, 40), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_afhq(root: Path, prefix: str = "afhq") -> Path:
    """A tiny AFHQ-like folder: 2 images per split and label, plus junk that must be skipped."""
    base = root / prefix if prefix else root
    for split in ("train", "val"):
        for i, label in enumerate(("cat", "dog", "wild")):
            folder = base / split / label
            folder.mkdir(parents=True)
            for n in range(2):
                (folder / f"flickr_{label}_{n:06d}.jpg").write_bytes(jpeg((40 * i, 10 * n, 99), (50 + n, 40)))
    (base / "train" / "cat" / "broken.jpg").write_bytes(jpeg()[:300])  # truncated JPEG
    (base / "train" / "dog" / "notes.txt").write_text("not an image")
    (base / "train" / "wild" / ".DS_Store").write_bytes(b"\0\0")
    (base / "test" / "cat").mkdir(parents=True)
    (base / "test" / "cat" / "elsewhere.jpg").write_bytes(jpeg())
    return root


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_synthetic_writes_store_and_csv(tmp_path):
    report = extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=5, seed=1)
    rows = read_csv(tmp_path / "meta.csv")
    assert report.written == 15 and len(rows) == 15 and not report.skipped
    assert {r["split"] for r in rows} == {"train", "val"} and {r["label"] for r in rows} == {"cat", "dog", "wild"}
    for row in rows:
        file = tmp_path / "images" / row["path"]
        assert file.is_file() and file.stat().st_size == int(row["bytes"])
        assert row["path"].startswith(f"{row['split']}/{row['label']}/")
        assert '"fur_color"' in row["attributes"] and '"pattern"' in row["attributes"]


def test_synthetic_is_deterministic_and_rerun_is_idempotent(tmp_path):
    extract("synthetic", tmp_path / "a", tmp_path / "a.csv", images_per_class=4, seed=3)
    again = extract("synthetic", tmp_path / "a", tmp_path / "a.csv", images_per_class=4, seed=3)
    extract("synthetic", tmp_path / "b", tmp_path / "b.csv", images_per_class=4, seed=3)
    assert again.written == 0 and again.unchanged == 12
    assert [r["sha256"] for r in read_csv(tmp_path / "a.csv")] == [r["sha256"] for r in read_csv(tmp_path / "b.csv")]


def test_afhq_folder_skips_bad_files_and_counts_them(tmp_path):
    source = make_afhq(tmp_path / "download")
    report = extract(str(source), tmp_path / "images", tmp_path / "meta.csv")
    rows = read_csv(tmp_path / "meta.csv")
    assert len(rows) == 12 and report.written == 12
    assert len(report.skipped) == 2  # the truncated JPEG and the text file
    assert any("broken.jpg" in s for s in report.skipped) and any("notes.txt" in s for s in report.skipped)
    assert report.ignored == 2  # .DS_Store and test/cat/elsewhere.jpg are outside the layout
    assert {r["source"] for r in rows} == {"download"}


def test_afhq_zip_without_top_folder(tmp_path):
    source = make_afhq(tmp_path / "download", prefix="")
    archive = tmp_path / "afhq.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in source.rglob("*"):
            if file.is_file():
                zf.write(file, file.relative_to(source).as_posix())
        zf.writestr("../../evil/train/cat/x.jpg", jpeg())  # a hostile entry never escapes the store
    report = extract(str(archive), tmp_path / "images", tmp_path / "meta.csv")
    assert report.written == 12 and len(report.skipped) == 2
    assert not (tmp_path / "evil").exists()
    assert all((tmp_path / "images").resolve() in f.resolve().parents for f in (tmp_path / "images").rglob("*.jpg"))


def test_same_name_different_image_keeps_both(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for root, color in ((first, (255, 0, 0)), (second, (0, 0, 255))):
        (root / "train" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "a.jpg").write_bytes(jpeg(color))
    extract(str(first), tmp_path / "images", tmp_path / "1.csv")
    extract(str(second), tmp_path / "images", tmp_path / "2.csv")
    files = sorted((tmp_path / "images" / "train" / "cat").iterdir())
    assert len(files) == 2 and files[0].read_bytes() != files[1].read_bytes()
    assert read_csv(tmp_path / "2.csv")[0]["path"] != "train/cat/a.jpg"


def test_odd_file_names_are_made_safe(tmp_path):
    folder = tmp_path / "src" / "val" / "dog"
    folder.mkdir(parents=True)
    (folder / 'it\'s a "dog"; DROP TABLE images;--.JPG').write_bytes(jpeg())
    extract(str(tmp_path / "src"), tmp_path / "images", tmp_path / "meta.csv")
    (row,) = read_csv(tmp_path / "meta.csv")
    assert row["path"].startswith("val/dog/") and row["path"].endswith(".jpg")
    assert all(c.isalnum() or c in "/._-" for c in row["path"])


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda p: p / "missing", "source not found"),
        (lambda p: (p / "flat").mkdir() or ((p / "flat" / "a.jpg").write_bytes(jpeg()) and p / "flat"), "no images laid out"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images laid out"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "neither a folder nor a .zip"),
    ],
)
def test_bad_sources_are_one_clear_error(tmp_path, make_source, message):
    with pytest.raises(SourceError, match=message):
        extract(str(make_source(tmp_path)), tmp_path / "images", tmp_path / "meta.csv")
    assert not (tmp_path / "meta.csv").exists()


def test_cli_reports_a_bad_source_in_one_line(tmp_path, capsys):
    from steps.extract import main

    assert main(["--source", str(tmp_path / "nope"), "--image-store", str(tmp_path / "i"), "--metadata", str(tmp_path / "m.csv")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/afhq-sample is not present")
def test_real_afhq_sample(tmp_path):
    report = extract(str(SHARED_SAMPLE), tmp_path / "images", tmp_path / "meta.csv")
    rows = read_csv(tmp_path / "meta.csv")
    assert len(rows) == 57 and not report.skipped
    counts = {
        (s, label): sum(r["split"] == s and r["label"] == label for r in rows) for s in ("train", "val") for label in ("cat", "dog", "wild")
    }
    assert counts == {
        ("train", "cat"): 5,
        ("train", "dog"): 5,
        ("train", "wild"): 5,
        ("val", "cat"): 16,
        ("val", "dog"): 11,
        ("val", "wild"): 15,
    }
    assert {(r["width"], r["height"]) for r in rows} == {("512", "512")}


# --- AFHQ-sized synthetic images, the default unchanged, progress, the CSV written atomically ------


def test_synthetic_size_512_writes_afhq_sized_jpegs(tmp_path):
    report = extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=2, seed=1, synthetic_size=512)
    rows = read_csv(tmp_path / "meta.csv")
    assert report.written == 6 and len(rows) == 6
    for row in rows:
        image = Image.open(tmp_path / "images" / row["path"])
        assert image.format == "JPEG" and image.size == (512, 512)
        assert (row["width"], row["height"]) == ("512", "512")
        assert 20_000 < int(row["bytes"]) < 90_000  # AFHQ's photos: 27 to 75 KB


def test_default_synthetic_files_are_the_generator_at_its_own_size(tmp_path):
    from steps.synthetic import draw_face

    extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=2, seed=4)
    row = read_csv(tmp_path / "meta.csv")[0]
    assert (row["path"], row["width"]) == ("train/cat/synthetic_cat_00000.jpg", "128")
    buffer = io.BytesIO()
    draw_face("cat", [4, 0, 0, 0])[0].save(buffer, "JPEG", quality=92)
    assert (tmp_path / "images" / row["path"]).read_bytes() == buffer.getvalue()


def test_parallel_drawing_gives_the_same_images_in_the_same_order(monkeypatch):
    from steps import extract as module

    serial = list(module._synthetic(4, 0.25, 9, 64))
    monkeypatch.setattr(module, "PARALLEL_FROM", 1)  # a pool even for 12 images
    parallel = list(module._synthetic(4, 0.25, 9, 64))
    assert [(i.split, i.label, i.name, i.data) for i in parallel] == [(i.split, i.label, i.name, i.data) for i in serial]


@pytest.mark.parametrize("size", [0, 15, 5000])
def test_bad_synthetic_size_is_one_clear_error(tmp_path, size, capsys):
    from steps.extract import main

    assert (
        main(
            [
                "--synthetic-size",
                str(size),
                "--image-store",
                str(tmp_path / "i"),
                "--metadata",
                str(tmp_path / "m.csv"),
                "--images-per-class",
                "1",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert "synthetic_size must be" in error and error.count("\n") == 0


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, capsys):
    extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=10, seed=2)
    lines = capsys.readouterr().err.strip().splitlines()  # pytest's capture is not a terminal
    assert 2 <= len(lines) <= 11 and all(line.startswith("extract: ") for line in lines)
    assert "\r" not in "".join(lines) and lines[-1].startswith("extract: 30/30 img (100%)")


def test_a_failed_run_leaves_the_previous_csv_whole(tmp_path, monkeypatch):
    from steps import extract as module

    extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=2, seed=3)
    before = (tmp_path / "meta.csv").read_bytes()
    calls = []

    def fail_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_row(*args)

    real_row = module._row
    monkeypatch.setattr(module, "_row", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=3, seed=3)
    assert (tmp_path / "meta.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "meta.csv"]  # no partial file left
