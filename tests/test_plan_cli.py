"""`kimi-cluster plan`: what-if planning for real Kimi models on Macs, without any weights."""

import json
import subprocess
import sys
from pathlib import Path

from mlx_kimi.checkpoint import open_checkpoint

KIMI = str(Path(sys.executable).parent / "kimi-cluster")


def plan(*args) -> dict:
    out = subprocess.run([KIMI, "plan", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_two_192gb_macs_need_a_raised_wired_limit_for_k25():
    default = plan("--model", "kimi-k2.5", "--expert-bits", "2", "--other-bits", "4", "--node", "192GB", "--node", "192GB")
    assert not default["feasible"] and default["stages"] == []
    assert abs(default["total_bytes"] - 323.9e9) / 323.9e9 < 0.002
    # A 192GB Mac has 192 GiB (Apple's binary GB); 75% of 2 x 192 GiB is 309.2 GB: the weights alone
    # are 14.7 GB more than that.
    assert default["shortfall_bytes"] > default["total_bytes"] - 2 * 0.75 * 192 * 2**30
    assert set(default["wired_limit_mb"]) == {"mac1", "mac2"}
    assert any("iogpu.wired_limit_mb=" in line for line in default["advice"])

    raised = plan("--model", "kimi-k2.5", "--node", "192GB", "--node", "192GB", "--wired-limit-mb", "180000")
    assert raised["feasible"]
    stages = raised["stages"]
    assert [s["node"] for s in stages] == ["mac1", "mac2"]
    assert stages[0]["start"] == 0 and stages[0]["end"] == stages[1]["start"] and stages[1]["end"] == 61
    for s in stages:
        assert s["weight_bytes"] + s["kv_bytes"] + s["scratch_bytes"] <= s["usable_bytes"] == 180000 * 2**20


def test_plan_of_a_checkpoint_directory_uses_its_exact_bytes(tiny_dir):
    result = plan("--model", str(tiny_dir), "--node", "1GB", "--node", "1GB", "--context", "1024")
    assert result["feasible"]
    assert sum(s["weight_bytes"] for s in result["stages"]) == open_checkpoint(tiny_dir).sizes().total_bytes
