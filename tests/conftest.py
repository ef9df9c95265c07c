"""Shared fixtures: tiny Kimi checkpoints (built once per session) and the mlx-lm oracle.

The single-process mlx-lm model loaded from the same checkpoint is the reference every
slice / cluster test compares against.
"""

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step

from mlx_kimi.tiny import TinyShape, make_tiny

TINY_LAYERS = 6
TINY_SHARDS = 3
TINY_DSV3_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny kimi_k25-layout checkpoint: 6 layers over 3 shard files. Treat it as read-only:
    tests that damage a checkpoint must work on a copy."""
    out = tmp_path_factory.mktemp("tiny_k25") / "ckpt"
    return make_tiny(out, TinyShape(layers=TINY_LAYERS, shard_files=TINY_SHARDS), model_type="kimi_k25")


@pytest.fixture(scope="session")
def tiny_dsv3_dir(tmp_path_factory):
    """A tiny deepseek_v3-layout checkpoint (how mlx-lm lays out K2): 4 layers. Read-only."""
    out = tmp_path_factory.mktemp("tiny_dsv3") / "ckpt"
    return make_tiny(out, TinyShape(layers=TINY_DSV3_LAYERS), model_type="deepseek_v3")


@pytest.fixture(scope="session")
def oracle(tiny_dir):
    """(model, tokenizer) of the whole tiny checkpoint loaded by mlx-lm in this process."""
    return mlx_lm.load(str(tiny_dir))


def chat_prompt(tokenizer, text: str = "Hi!", system: str = "Be brief.") -> list:
    """Token ids of a one-turn chat prompt, ready for the assistant's reply (ends with <think>).

    A short system message replaces the template's default one: the tiny tokenizer spends about a
    token per character and a CPU forward costs about 50 ms per token, so short prompts keep the
    suite fast (29 tokens here instead of about 50)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@pytest.fixture(scope="session")
def make_chat_prompt():
    """make_chat_prompt(tokenizer, text=...) -> token ids of a one-turn chat prompt."""
    return chat_prompt


@pytest.fixture(scope="session")
def chat_prompt_ids(oracle):
    """A chat-templated prompt for the tiny model (list of ints)."""
    return chat_prompt(oracle[1])


def _oracle_tokens(model, prompt_ids, max_tokens, sampler=None) -> list:
    """The tokens mlx-lm's own generation loop produces (greedy unless `sampler` is given)."""
    return [
        int(tok)
        for tok, _ in generate_step(
            mx.array(prompt_ids), model, max_tokens=max_tokens, sampler=sampler
        )
    ]


@pytest.fixture(scope="session")
def oracle_tokens():
    """oracle_tokens(model, prompt_ids, max_tokens, sampler=None) -> list of ints."""
    return _oracle_tokens


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (tests/browser.py) for the web view tests; skipped where there is none."""
    import browser as browser_module

    if browser_module.CHROMIUM is None:
        pytest.skip("no chromium: scripts/setup installs it (apt-get install chromium)")
    b = browser_module.Browser(tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()
