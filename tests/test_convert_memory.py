"""convert's peak memory is flat: it grows with the row-block size, not with the model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlx_kimi.sources import open_source
from mlx_kimi.official import write_official
from mlx_kimi.tiny import TinyShape

CHUNK = 2 * 2**20
BOUND = 32 * 2**20 + 2 * CHUNK  # the README's claim: 32 MB + 2 x chunk above the idle process

PROBE = textwrap.dedent("""
    import json, sys
    from mlx_kimi.convert import convert
    from mlx_kimi.spec import QuantScheme

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    big, small, out, chunk = sys.argv[1:5]
    recipe = QuantScheme(2, 4, 64).params
    convert(small, out + "-warm-up", recipe, chunk_bytes=int(chunk))  # every code path imported and run once
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    idle = status("VmRSS")
    convert(big, out, recipe, chunk_bytes=int(chunk))
    print(json.dumps({"idle": idle, "peak": status("VmHWM")}))
""")


def peak_growth(probe: str, *args) -> int:
    """Run `probe` in a fresh interpreter with `args`; its peak RSS above its idle RSS, in bytes."""
    result = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    return rss["peak"] - rss["idle"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_peak_rss_bounded_below_the_model(tmp_path):
    shape = TinyShape(layers=2, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=768,
                      routed_experts=32, vocab_size=1536)
    big = write_official(tmp_path / "big", "k2-instruct", shape)
    small = write_official(tmp_path / "small", "k2-instruct")
    params, mtp = 0, f"model.layers.{shape.layers}."
    for t in open_source(big).tensors.values():
        if not t.name.endswith("scale_inv") and not t.name.startswith(mtp):
            n = 1
            for d in t.shape:
                n *= d
            params += n
    whole_bf16 = 2 * params  # what loading the dequantized model whole would hold
    assert whole_bf16 > 3 * BOUND

    grown = peak_growth(PROBE, big, small, tmp_path / "out", CHUNK)
    print(f"peak RSS above idle: {grown / 2**20:.1f} MiB; bound {BOUND / 2**20:.0f} MiB; "
          f"model in bf16 {whole_bf16 / 2**20:.0f} MiB")
    assert grown < BOUND


CALIBRATED_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mlx_kimi.calibrate import Calibration
    from mlx_kimi.calibration_set import calibration_ids
    import mlx.core as mx
    from mlx_kimi.convert import CALIBRATION_DIR, convert, plan_targets
    from mlx_kimi.sources import open_source
    from mlx_kimi.spec import QuantScheme

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    def calibration(src, out, n):
        return Calibration(open_source(src), calibration_ids(src, n), Path(out) / CALIBRATION_DIR,
                           chunk_bytes=int(chunk))

    def measure(src, out):  # --fit's measuring pass
        calibration(src, out, int(measure_tokens)).measure(
            plan_targets(open_source(src).config, lambda name, module: False), mx.bfloat16)

    def run(src, out):  # the quantizing pass, with GPTQ
        convert(src, out, QuantScheme(2, 4, 64).params, chunk_bytes=int(chunk),
                calibration=calibration(src, out, int(tokens)))

    big, mid, small, out, chunk, tokens, measure_tokens = sys.argv[1:8]
    measure(small, out + "-warm-up-measure")
    run(small, out + "-warm-up")
    open("/proc/self/clear_refs", "w").write("5")
    idle = status("VmRSS")
    measure(mid, out + "-measure")
    run(big, out)
    print(json.dumps({"idle": idle, "peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_calibrated_peak_rss_bounded_below_the_model(tmp_path):
    """The streamed calibration holds one layer's unit (one expert, the attention block), the
    calibration set's hidden states and (while measuring) the amplification streams, never the
    model: peak_bytes_bound, independent of the experts. --fit's measuring pass runs on a model of
    32 experts a layer with 16 calibration tokens (every candidate's error of every expert on the
    tokens routed to it costs ~10 ms on this CPU), the quantizing pass with GPTQ on the
    same dimensions with 128 experts and 128 tokens; one peak for both, under the bound of the larger."""
    from mlx_kimi.calibrate import peak_bytes_bound

    shapes = {experts: TinyShape(layers=3, hidden_size=512, intermediate_size=512, moe_intermediate_size=256,
                                 routed_experts=experts, experts_per_token=8, vocab_size=1024) for experts in (32, 128)}
    mid, big = (write_official(tmp_path / f"e{n}", "k2.5-bf16", shape) for n, shape in shapes.items())
    small = write_official(tmp_path / "small", "k2.5-bf16")
    tokens = 128
    bound = peak_bytes_bound(open_source(big).config, tokens, CHUNK)
    assert bound == peak_bytes_bound(open_source(mid).config, tokens, CHUNK)

    def whole_bf16(path):
        return 2 * sum(int(np.prod(t.shape)) for t in open_source(path).tensors.values()
                       if not t.name.startswith("model.layers.3."))

    assert whole_bf16(big) > 3 * bound and whole_bf16(mid) > bound

    grown = peak_growth(CALIBRATED_PROBE, big, mid, small, tmp_path / "out", CHUNK, tokens, 16)
    print(f"calibrated: peak RSS above idle {grown / 2**20:.1f} MiB; bound {bound / 2**20:.0f} MiB; "
          f"models in bf16 {whole_bf16(mid) / 2**20:.0f} and {whole_bf16(big) / 2**20:.0f} MiB")
    assert grown < bound
