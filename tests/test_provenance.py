"""Every output records what made it; a rerun skips only outputs made the same way.

The command runs with the stand-in network of ``test_predict_cli`` (the records are built from
the run's request, before the model loads, so the stand-in is enough); the seed test builds
the tiny network for real.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from depthpro_fast import cli, outputs, provenance
from tests import test_predict_cli
from tests.test_io import noisy_rgb

fake_model = test_predict_cli.fake_model  # the stand-in network's fixture


def photo(folder, name="photo.jpg", seed=0):
    path = folder / name
    Image.fromarray(noisy_rgb(12, 16, seed=seed)).save(path, quality=95)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["predict", *argv, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_readme_path_random_then_real_weights_recomputes_and_says_why(tmp_path, fake_model,
                                                                       capsys):
    """`predict --config tiny --random-weights photo.jpg`, then `predict photo.jpg`: the
    meaningless depth is replaced, and the summary says why."""
    photo(tmp_path)
    rc, out, _ = run(capsys, "--config", "tiny", "--random-weights", "photo.jpg")
    assert rc == 0 and "1 written" in out
    with np.load(tmp_path / "depthpro_out" / "photo.npz") as z:
        assert bool(z["random_weights"])
    rc, out, err = run(capsys, "photo.jpg")
    assert rc == 0
    assert "nothing left to do" not in out
    assert "1 image: 1 written, 0 skipped" in out
    assert "1 image was made with random weights: recomputed" in out
    assert "1 image was made with random weights: recomputed" in err  # also before the work
    assert len(fake_model.loads) == 2
    for fmt in ("photo.npz", "photo.color.png"):
        record = outputs.read_provenance(tmp_path / "depthpro_out" / fmt)
        assert record["weights"] == "checkpoint" and record["random_weights"] is False
    with np.load(tmp_path / "depthpro_out" / "photo.npz") as z:
        assert "random_weights" not in z.files
    # now made the same way: skipped, the model not loaded
    rc, out, _ = run(capsys, "photo.jpg")
    assert "nothing left to do" in out and "1 skipped (made the same way)" in out
    assert len(fake_model.loads) == 2


BASE = ["--random-weights", "--config", "tiny", "--dtype", "fp32", "--fast", "--save", "all"]


@pytest.mark.parametrize("change, reason", [
    (["--config", "official"], "made with config tiny (now official)"),
    (["--seed", "1"], "made with random weights of seed 0 (now 1)"),
    (["--dtype", "bf16"], "made with dtype float32 (now bfloat16)"),
    (["--no-fast"], "made with the fast path (now the reference path)"),
    (["--f-px", "100"], "made with the EXIF focal length or the estimate (now --f-px 100)"),
    (["--ignore-exif"], "(now the estimated focal length (--ignore-exif))"),
    (["--ply-stride", "2"], "ply stride request auto <= 4194304 points (now 2)"),
])
def test_a_changed_recipe_recomputes_with_the_reason(tmp_path, fake_model, capsys, change,
                                                     reason):
    photo(tmp_path)
    out_dir = tmp_path / "o"
    argv = ["photo.jpg", "-o", str(out_dir), *BASE]
    assert run(capsys, *argv)[0] == 0
    rc, out, _ = run(capsys, *argv)  # the same again: skipped
    assert rc == 0 and "nothing left to do" in out
    argv = [*argv, *change]  # argparse: the last one wins
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "1 written, 0 skipped" in out
    line = next(li for li in out.splitlines() if li.endswith(": recomputed"))
    assert reason in line, line
    rc, out, _ = run(capsys, *argv)  # and now that is what the files say
    assert "nothing left to do" in out, out


def test_records_in_every_format(tmp_path, fake_model, capsys):
    src = photo(tmp_path)
    assert run(capsys, str(src), "-o", "o", *BASE, "--seed", "7", "--f-px", "50")[0] == 0
    records = {fmt: outputs.read_provenance(tmp_path / "o" / f"photo{suffix}")
               for fmt, suffix in outputs.FORMATS.items()}
    for fmt, r in records.items():
        assert r["format"] == provenance.FORMAT and r["output"] == fmt
        assert r["weights"] == "random" and r["random_weights"] is True and r["seed"] == 7
        assert r["checkpoint"] is None and r["checkpoint_id"] is None
        assert r["config"] == "tiny" and len(r["config_id"]) == 12
        assert r["dtype"] == "float32" and r["path"] == "fast" and r["backend"] == "auto"
        assert r["focal"] == "given" and r["f_px"] == 50.0 and r["intrinsics"] is None
        assert r["focallength_px"] == pytest.approx(50.0)
        assert r["focallength_source"] == "given" and r["fov_deg"] > 0
        assert r["image_size"] == [12, 16]
        assert r["input"]["name"] == "photo.jpg"
        assert r["input"]["size"] == src.stat().st_size
        assert r["package"] and r["device"] == "cpu"
    assert records["ply"]["ply_stride"] == 1 and records["ply"]["ply_binary"] is True
    # the PLY record is one header comment line, the PNG's a text chunk
    head = (tmp_path / "o" / "photo.ply").read_bytes().split(b"end_header")[0].decode()
    assert sum(line.startswith("comment depthpro_fast {") for line in head.splitlines()) == 1
    with Image.open(tmp_path / "o" / "photo.depth_mm.png") as im:
        assert "depthpro_fast" in im.info


def test_checkpoint_identity_input_and_old_files(tmp_path, fake_model, capsys):
    src = photo(tmp_path)
    ckpt = tmp_path / "some.pt"
    argv = [str(src), "-o", "o", "--checkpoint", str(ckpt)]
    assert run(capsys, *argv)[0] == 0
    # the same checkpoint copied elsewhere (new path, new mtime): the same identity
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(ckpt, copy)
    rc, out, _ = run(capsys, str(src), "-o", "o", "--checkpoint", str(copy))
    assert "nothing left to do" in out
    # other weights of the same size: recomputed
    ckpt.write_bytes(b"Stand-in weights")
    rc, out, _ = run(capsys, *argv)
    assert "1 image was made with another checkpoint" in out
    # a touched but identical input: skipped; an edited one: recomputed
    os.utime(src, ns=(1, 1))
    assert "nothing left to do" in run(capsys, *argv)[1]
    Image.fromarray(noisy_rgb(12, 16, seed=5)).save(src, quality=95)
    rc, out, _ = run(capsys, *argv)
    assert "1 image was made with an earlier version of the input image: recomputed" in out
    # an output without a record (an older version wrote it): recomputed
    outputs.write_npz(tmp_path / "o" / "photo.npz", np.ones((12, 16), np.float32), 10.0, 60.0)
    rc, out, _ = run(capsys, *argv)
    assert "1 image had no record of what made its outputs" in out and "1 written" in out


def test_missing_checkpoint_is_an_error_even_when_outputs_exist(tmp_path, fake_model, capsys):
    src = photo(tmp_path)
    assert run(capsys, str(src), "-o", "o")[0] == 0
    rc, _, err = run(capsys, str(src), "-o", "o", "--checkpoint", str(tmp_path / "gone.pt"))
    assert rc == 1 and "checkpoint not found" in err


def test_seed_only_with_random_weights(tmp_path, fake_model, capsys):
    src = photo(tmp_path)
    rc, _, err = run(capsys, str(src), "--seed", "3")
    assert rc == 1 and "--seed 3 applies to --random-weights only" in err
    assert run(capsys, str(src), "--random-weights", "--config", "tiny", "--seed", "3")[0] == 0
    assert fake_model.loads[-1][1]["seed"] == 3


def test_unseeded_random_weights_never_match():
    recipe = provenance.Recipe("random", None, None, None, "tiny", "x", "float32", "fast",
                               "exif-or-estimated")
    assert provenance.mismatch(recipe.as_dict(), recipe) == \
        "random weights of seed None (now unseeded)"
    seeded = provenance.Recipe("random", None, None, 0, "tiny", "x", "float32", "fast",
                               "exif-or-estimated")
    assert provenance.mismatch(seeded.as_dict(), seeded) is None
    assert provenance.mismatch({**seeded.as_dict(), "format": 0}, seeded).startswith(
        "record format 0")
    assert provenance.mismatch(None, seeded).startswith("no record")


def test_file_fingerprint_sampled_for_big_files(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert provenance.file_fingerprint(small).startswith("3 bytes sha256:")
    big = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 40 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    first = provenance.file_fingerprint(big)
    assert first.startswith(f"{40 << 20} bytes sha256s:")
    copy = tmp_path / "copy.bin"
    shutil.copy(big, copy)
    os.utime(copy, ns=(5, 5))
    assert provenance.file_fingerprint(copy) == first  # content, not path or mtime
    for where in (0, len(data) - 1, 4 << 20):  # head, tail, the first spread block
        changed = bytearray(data)
        changed[where] ^= 1
        copy.write_bytes(changed)
        assert provenance.file_fingerprint(copy) != first, where
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    assert "folder-sha256:" in provenance.file_fingerprint(folder)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        provenance.file_fingerprint(tmp_path / "nope.pt")


def test_load_none_is_seeded_by_default():
    import depthpro_fast

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = depthpro_fast.load(None, config="tiny", device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b, _ = depthpro_fast.load(None, config="tiny", device="cpu")
    c, _ = depthpro_fast.load(None, config="tiny", device="cpu", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same network every call
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # another seed, another network
    with pytest.raises(TypeError, match="seed"):
        depthpro_fast.load(None, config="tiny", device="cpu", seed="1")


def test_demo_is_seeded_and_records_it(tmp_path, capsys):
    import json

    runs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"d{i}.npz"
        assert cli.main(["demo", "--size", "24x32", "--out", str(out), "--seed",
                         str(seed)]) == 0
        with np.load(out) as z:
            runs.append((z["depth"], json.loads(str(z["provenance"]))))
    assert np.array_equal(runs[0][0], runs[1][0])  # the same network and image again
    assert not np.array_equal(runs[0][0], runs[2][0])
    record = runs[2][1]
    assert record["seed"] == 1 and record["weights"] == "random" and record["config"] == "tiny"
    assert record["path"] == "reference" and record["dtype"] == "float32"
