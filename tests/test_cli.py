import json
import re

import pytest
from typer.testing import CliRunner

import embedx
from embedx.cli import app

runner = CliRunner()


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return group, sorted(group.commands)


def test_every_command_has_help_with_an_example():
    group, names = _commands()
    assert {"extract", "info"} <= set(names)
    for name in names:
        cmd = group.commands[name]
        assert cmd.help and "Examples:" in cmd.help, name
        result = runner.invoke(app, [*name.split(), "--help"], terminal_width=100)
        assert result.exit_code == 0, (name, result.output)
        # each example stays one line, as written (click would rewrap the paragraph without \b)
        examples = [line.strip() for line in cmd.help.split("Examples:")[1].splitlines()
                    if line.strip().startswith("embedx ")]
        assert examples, name
        shown = [line.strip() for line in result.output.splitlines()]
        for example in examples:
            assert example in shown, (name, example, result.output)


def test_cli_disk_full_says_what_to_do_and_the_rerun_resumes(tiny_dir, tmp_path, monkeypatch):
    import errno

    import embedx
    from embedx import shards

    real_write = shards.write_shard
    written = []

    def write_shard(directory, index, *args, **kwargs):
        if index == 1:  # the second shard finds the disk full (pyarrow's OSError carries the errno)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(index)
        return real_write(directory, index, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", write_shard)
    args = ["extract", str(tiny_dir), "--out", str(tmp_path / "f"), "--num-workers", "0", "--no-progress",
            "--shard-size", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Error: No space left on device. The disk is full: free some space" in result.output
    assert "Then rerun the same command: completed work is kept" in result.output
    assert "Traceback" not in result.output
    assert written == [0]
    monkeypatch.setattr(shards, "write_shard", real_write)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(embedx.read_features(tmp_path / "f").paths) == 24
    # an OSError nobody can act on keeps its traceback (a bug to report, not advice to give)
    monkeypatch.setattr(shards, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    other = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(tmp_path / "g"), "--num-workers", "0",
                                "--no-progress"])
    assert other.exit_code != 0 and isinstance(other.exception, OSError)


def test_cli_extract_says_what_it_left_out_and_when_nothing_is_left(tiny_dir, tmp_path, caplog):
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for f in sorted(tiny_dir.rglob("*.jpg"))[:2]:
        shutil.copy(f, src / f.name)
    (src / "notes.txt").write_text("not an image")
    (src / "labels.json").write_text("{}")
    (src / "again").symlink_to(".")  # a symlink loop: skipped, and said
    result = runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "f"), "--num-workers", "0",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 embedded, 0 errors" in result.output
    assert "Left out as not images by their extension: 2 files (.json: 1, .txt: 1)" in result.output
    # a warning (stderr, through logging's last-resort handler outside tests)
    assert f"Skipped 1 folder: {src / 'again'} (symlink loop" in caplog.text
    assert re.search(r"Time: model \d+\.\d s \(\d+%\)", result.output), result.output  # where the time went
    # the same command again: nothing left to do, and it says so (no "0.0 img/s")
    again = runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "f"), "--num-workers", "0",
                                "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "Nothing to do: all 2 images were done by an earlier run (2 embedded, 0 errors;" in again.output
    assert "img/s" not in again.output
    # the folder grows by one and loses one: refused without --update, which adds only the new one
    (src / sorted(tiny_dir.rglob("*.jpg"))[0].name).unlink()
    new = sorted(tiny_dir.rglob("*.jpg"))[2]
    shutil.copy(new, src / new.name)
    args = ["extract", str(src), "--out", str(tmp_path / "f"), "--num-workers", "0", "--no-progress"]
    refused = runner.invoke(app, args)
    assert refused.exit_code != 0 and "lacks 1 of the input's images (it holds the other 1)" in refused.output
    assert "Add them with --update" in refused.output and "Traceback" not in refused.output
    grown = runner.invoke(app, [*args, "--update"])
    assert grown.exit_code == 0, grown.output
    assert "3 embedded, 0 errors (2 done by an earlier run)" in grown.output
    assert "Added 1 new image as new rows; `embedx index add IDX" in grown.output
    assert "Kept as they were: 1 row whose images are no longer in the input" in grown.output


def test_cli_extract_then_info(tiny_dir, tmp_path):
    out = tmp_path / "f"
    result = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out), "--num-workers", "0",
                                 "--shard-size", "10", "--no-progress", "--crop-pct", "1.0", "--pool", "max"])
    assert result.exit_code == 0, result.output
    assert "24 embedded, 0 errors" in result.output
    # the engine's rate is reported apart from the one-off start-up (imports, model loading)
    assert re.search(r"img/s after \d+\.\d s of start-up", result.output), result.output
    assert len(embedx.read_features(out)) == 24
    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["rows"] == 24 and d["dim"] == 1280 and d["classes"] == 3 and d["shards"] == 3
    meta = embedx.read_features(out).metadata  # provenance as stored, e.g. which decoder made the pixels
    assert d["precision"] == meta["precision"] and d["decode"] == meta["decode"] == "pil-draft2x+uint8-resize"
    # the options reached the run: the whole short side kept, max pooling
    assert d["preprocess"] == "224x224, crop 1.0 (center), bicubic" and d["pooling"] == meta["pooling"] == "max"
    plain = runner.invoke(app, ["info", str(out)])
    assert "preprocess: 224x224, crop 1.0 (center), bicubic" in plain.output and "pooling: max" in plain.output


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    result = runner.invoke(app, ["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "no feature shards" in result.output


def test_import_embedx_is_light():
    import subprocess
    import sys

    code = "import sys, embedx; print('torch' in sys.modules, 'faiss' in sys.modules, 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False False"


@pytest.mark.parametrize("name", ["extract", "read_features", "ExtractConfig", "load_backbone"])
def test_public_api_names(name):
    assert callable(getattr(embedx, name))


@pytest.mark.parametrize("flag, expected", [([], None), (["--fp32-stem"], True), (["--no-fp32-stem"], False)])
def test_extract_fp32_stem_flag_is_auto_unless_given(tmp_path, monkeypatch, flag, expected):
    """Unset, the engine decides (on a CPU only); --fp32-stem asks for it on any device."""
    import embedx.extractor

    seen = {}

    def capture(inputs, out, config, **kwargs):
        seen["fp32_stem"] = config.fp32_stem
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(embedx.extractor, "extract", capture)
    runner.invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "f"), *flag])
    assert seen == {"fp32_stem": expected}


def test_time_shares_say_where_the_time_went_and_when_the_gpu_starved(capsys):
    from embedx.cli import _echo_time_shares
    from embedx.extractor import ExtractResult

    stages = {"plan": 0.2, "startup": 0.3, "input_wait": 4.0, "model": 5.0, "write": 0.4, "loader_wait": 3.9}
    r = ExtractResult("out", 100, 100, 0, 0, 10.0, 1, "bf16", "cuda", stage_seconds=stages)
    assert r.time_shares() == pytest.approx({"model": 5.0, "waiting for images": 4.0, "writing": 0.4, "start-up": 0.5,
                                             "other": 0.1})
    _echo_time_shares(r)
    err = capsys.readouterr().err
    assert "Time: model 5.0 s (50%), waiting for images 4.0 s (40%), writing 0.4 s (4%), start-up 0.5 s (5%)" in err
    assert "the decoders are the bottleneck" in err
    # the same share on a CPU (decoding between batches, by design): no GPU advice; engines without stages: no line
    _echo_time_shares(ExtractResult("out", 100, 100, 0, 0, 10.0, 1, "bf16", "cpu", stage_seconds=stages))
    assert "bottleneck" not in capsys.readouterr().err
    assert ExtractResult("out", 100, 100, 0, 0, 10.0, 1, "bf16", "cpu", stage_seconds={"ray": 9.0}).time_shares() == {}
