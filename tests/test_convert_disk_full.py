"""A disk that fills up in the middle of a layer of a calibrated conversion (a real ENOSPC, on a small
tmpfs filled as another program would fill it): the error names the shard and says that running the
same command again resumes; run again with the space freed, the output is byte-identical to an
uninterrupted conversion."""

import dataclasses
import errno
import json
import subprocess

import pytest

from mlx_kimi.calibrate import Calibration
from mlx_kimi.calibration_set import calibration_ids
from mlx_kimi.convert import CALIBRATION_DIR, ConvertError, convert
from mlx_kimi.official import OFFICIAL_TINY_SHAPE, write_official
from mlx_kimi.quality_card import CARD_FILE
from mlx_kimi.sources import open_source
from mlx_kimi.spec import QuantScheme

SHAPE = dataclasses.replace(OFFICIAL_TINY_SHAPE, layers=3, routed_experts=8, experts_per_token=2)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"a full disk is made by mounting a 16 MB tmpfs, which needs root or CAP_SYS_ADMIN: "
                    f"{mount.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk):
    """Write zeros to a file on `disk` until the kernel says it is full; returns the file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(2**16))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_disk_full_mid_layer_then_resume(tmp_path, small_disk):
    src = write_official(tmp_path / "src", "k2-instruct-bf16", SHAPE)
    source, ids = open_source(src), calibration_ids(src, 64)
    recipe = QuantScheme(2, 4, 64).params

    def calibration(out):
        return Calibration(source, ids, out / CALIBRATION_DIR, gptq=True)

    fresh = convert(src, tmp_path / "fresh", recipe, calibration=calibration(tmp_path / "fresh"))
    shards = sorted(p.name for p in fresh.out.glob("model-*.safetensors"))  # embed, layers 0-2, head
    fillers = []

    def fill_during_layer_1(event, part, file, nbytes):
        if event == "bytes" and part == 1 and not fillers:
            fillers.append(fill(small_disk))

    out = small_disk / "out"
    with pytest.raises(ConvertError) as failed:
        convert(src, out, recipe, progress=fill_during_layer_1, calibration=calibration(out))
    message = str(failed.value)
    assert fillers, "the disk was never filled"
    assert f"writing {shards[2]} (layer 1) failed: No space left on device" in message, message
    assert "2 of 5 shards are complete" in message and f"run the same command again: it resumes at {shards[2]}" \
        in message, message
    assert not list(out.glob("*.tmp"))  # the half-written shard's space is given back

    fillers[0].unlink()
    report = convert(src, out, recipe, calibration=calibration(out))
    assert report.reused == shards[:2] and report.written == shards[2:]
    assert report.model_id == fresh.model_id
    for file in fresh.out.glob("model*"):
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert json.loads((out / CARD_FILE).read_text()) == json.loads((fresh.out / CARD_FILE).read_text())
