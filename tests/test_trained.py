"""The trained tiny Kimi shipped in mlx_kimi/trained/: `make-tiny --trained` writes it in MLX and
official layouts that load (mlx-lm; `kimi-cluster convert`), its held-out perplexity is the recorded
one and far below a random model's, its tokenizer round-trips held-out text, and a 2-stage cluster
on it gives mlx-lm's tokens, speculating or not."""

import json
import subprocess

import mlx.core as mx
import pytest
from mlx_lm.models import deepseek_v3
from mlx_lm.utils import load_model

from harness import KIMI, LocalCluster, oracle_reply
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.quality import perplexity
from mlx_kimi.trained import TRAINED_DIR, trained_record
from mlx_kimi.trained_text import held_out_text

HELD_OUT_CHARS = 2400  # ~800 tokens: a slice of the held-out text, fast to run
WINDOW = trained_record()["held_out"]["window"]  # the context it was trained and measured with
LAYOUTS = ("k2-instruct-8bit", "k2-instruct-fp8", "k2.5-int4")


def _float32_model(path):
    model, config = load_model(path)
    model.set_dtype(mx.float32)  # MLX's CPU backend gathers unquantized experts in float32 only
    return model, config


@pytest.fixture(scope="module")
def held_out_ids():
    ids = load_tokenizer(TRAINED_DIR).encode(held_out_text(HELD_OUT_CHARS))
    assert len(ids) > 500
    return ids


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`kimi-cluster make-tiny --trained`, plain and in LAYOUTS, written at once."""
    root = tmp_path_factory.mktemp("trained")
    runs = {name: subprocess.Popen([KIMI, "make-tiny", str(root / name), "--trained"]
                                   + ([] if name == "plain" else ["--layout", name]),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in ("plain", *LAYOUTS)}
    done = {name: p.communicate(timeout=300)[0] for name, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values()), done
    return {name: root / name for name in runs}


def test_held_out_perplexity_is_the_recorded_one_and_far_below_random(held_out_ids):
    record = trained_record()
    model, config = _float32_model(TRAINED_DIR)
    trained = perplexity(model, held_out_ids, WINDOW)
    mx.random.seed(0)
    untrained = perplexity(deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config)), held_out_ids, WINDOW)
    # a slice of the held-out text, not the whole measured span: near the figure, not equal to it
    assert trained < 1.3 * record["held_out"]["perplexity"], (trained, record["held_out"])
    # 100 CPU steps make a weak model (recorded: 484 against 2048 for a uniform guess), but it has learned
    assert trained * 3 < min(untrained, record["held_out"]["uniform_perplexity"]), (trained, untrained)


def test_tokenizer_is_kimis_and_round_trips_held_out_text():
    tokenizer = load_tokenizer(TRAINED_DIR)
    assert type(tokenizer._tokenizer).__name__ == "KimiTokenizer"
    text = held_out_text(20_000)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # merges learned from the text, not bytes
    config = json.loads((TRAINED_DIR / "config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") < config["vocab_size"]


def test_make_tiny_trained_layouts_load_near_the_master(made, held_out_ids, tmp_path):
    """Every layout holds the trained weights: the MLX ones load in mlx-lm and the official ones
    convert (8-bit), each with a held-out perplexity within a few percent of the master's."""
    master = perplexity(_float32_model(made["plain"])[0], held_out_ids, WINDOW)
    for name in ("k2-instruct-fp8", "k2.5-int4"):
        convert = subprocess.run([KIMI, "convert", str(made[name]), str(tmp_path / name), "--expert-bits", "8",
                                  "--other-bits", "8", "--group-size", "32"], capture_output=True, text=True)
        assert convert.returncode == 0, convert.stdout + convert.stderr
    for name, path in [("k2-instruct-8bit", made["k2-instruct-8bit"]), ("k2-instruct-fp8", tmp_path / "k2-instruct-fp8"),
                       ("k2.5-int4", tmp_path / "k2.5-int4")]:
        ppl = perplexity(_float32_model(path)[0], held_out_ids, WINDOW)
        assert abs(ppl / master - 1) < 0.05, (name, ppl, master)


def test_two_stage_cluster_on_the_trained_model_equals_mlx_lm_with_and_without_speculation(made, tmp_path):
    """Greedy, the cluster's tokens are mlx-lm's with speculation forced on and off; asked to repeat a
    text, the trained model copies some of it, so prompt-lookup drafts are made and accepted."""
    model, _ = _float32_model(made["plain"])
    tokenizer = load_tokenizer(made["plain"])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("def parse(text):", f"Repeat this text exactly:\n{held_out_text(300)}")]
    with LocalCluster(tmp_path, made["plain"], stages=2, coordinator_extra=["--speculate", "on"]) as cluster:
        for prompt in prompts:
            expected = oracle_reply((model, tokenizer), prompt, 24)
            assert expected
            for speculate in (None, False):  # the cluster's default (on), and off for this request
                assert cluster.generate(prompt_tokens=prompt, max_tokens=24, speculate=speculate)[0] == expected
        spec = cluster.memory_map().speculation
    assert spec.drafted > 0 and spec.accepted > 0 and spec.steps < spec.tokens, spec
