"""Kimi's tiktoken tokenizer layout: the tiny writer, the loader's choices and refusals, eos ids."""

import base64
import json
import shutil

import pytest

from mlx_kimi.kimi_tokenizer import KimiTokenizer, load_tokenizer, read_tiktoken_ranks, split_long_text
from mlx_kimi.tokenizer import KIMI_CHAT_TEMPLATE, KIMI_SPECIAL_OFFSETS, write_tiktoken_tokenizer, write_tokenizer

VOCAB = 1024
BASE = VOCAB - 256  # base ranks; the specials follow, as 163584.. in Kimi K2


@pytest.fixture(scope="module")
def tik_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken")
    return path, write_tiktoken_tokenizer(path, VOCAB)


@pytest.fixture(scope="module")
def tok(tik_dir):
    return load_tokenizer(tik_dir[0])


def test_files_in_the_real_layout(tik_dir):
    path, eos = tik_dir
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "tokenization_kimi.py"):
        assert (path / name).is_file(), name
    assert not (path / "tokenizer.json").exists()
    lines = (path / "tiktoken.model").read_text().splitlines()
    assert len(lines) == BASE
    token, rank = lines[300].split()
    assert int(rank) == 300 and len(base64.b64decode(token)) >= 2
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    named = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    # Kimi K2's ids minus its 163584 base ranks (kimi-facts.md)
    real = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
            "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
            "<|tool_calls_section_begin|>": 163595, "<|tool_calls_section_end|>": 163596,
            "<|tool_call_begin|>": 163597, "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599,
            "<think>": 163606, "</think>": 163607}
    assert {t: named[t] - BASE for t in real} == {t: i - 163584 for t, i in real.items()}
    assert named["[PAD]"] == BASE + 255 == VOCAB - 1
    assert eos == [BASE + 1, BASE + 2]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == BASE + 2
    assert (path / "chat_template.jinja").read_text() == KIMI_CHAT_TEMPLATE


def test_vocabulary_has_multibyte_merges(tik_dir):
    ranks = read_tiktoken_ranks(tik_dir[0] / "tiktoken.model")
    def is_partial(token):  # bytes of a multi-byte character, not all of it
        try:
            token.decode()
            return False
        except UnicodeDecodeError:
            return len(token) >= 2
    assert any("你" in t.decode(errors="ignore") for t in ranks)  # whole Chinese characters
    assert any(is_partial(t) and t[0] >= 0xF0 for t in ranks)  # part of a 4-byte emoji
    assert any(is_partial(t) and 0xE4 <= t[0] <= 0xE9 for t in ranks)  # part of a CJK character


def test_writer_deterministic_and_size_checked(tmp_path, tik_dir):
    write_tiktoken_tokenizer(tmp_path / "again", VOCAB)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tik_dir[0] / name).read_bytes()
    with pytest.raises(ValueError, match="vocab_size 512 is too small"):
        write_tiktoken_tokenizer(tmp_path / "small", 512)


def test_special_tokens(tok):
    for name, offset in KIMI_SPECIAL_OFFSETS.items():
        assert tok.encode(name) == [BASE + offset]
        assert tok.convert_tokens_to_ids(name) == BASE + offset
        assert tok.decode([BASE + offset]) == name
    # Unnamed ids are reserved tokens, 258 in all; their strings in text are the tokens too.
    assert len(tok) == BASE + 258
    assert tok.encode(f"a<|reserved_token_{BASE + 5}|>b<|reserved_token_{BASE + 257}|>") == \
        [*tok.encode("a"), BASE + 5, *tok.encode("b"), BASE + 257]
    assert tok.bos_token_id == BASE and tok.eos_token_id == BASE + 1
    assert tok.decode(tok.encode("x<|im_end|>y"), skip_special_tokens=True) == "xy"


def test_wrapper_for_mlx_lm(tok):
    assert tok.has_thinking
    assert (tok.think_start_id, tok.think_end_id) == (BASE + 22, BASE + 23)
    assert tok.tool_call_start == "<|tool_calls_section_begin|>"
    assert tok.tool_parser is not None
    assert type(tok.detokenizer).__name__ == "ByteStreamingDetokenizer"
    # config.json has none here: [EOS] from tokenizer_config, <|im_end|> from generation_config.json
    assert tok.eos_token_ids == {BASE + 1, BASE + 2}


def test_chat_template_sorts_tools(tok):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"z": {"b": 1, "a": 2}, "a": []}}}]
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, add_generation_prompt=True,
                                  tokenize=False)
    assert out.startswith('<|im_system|>tool_declare<|im_middle|>[{"function": {"name": "f", "parameters": '
                          '{"a": [], "z": {"a": 2, "b": 1}}}, "type": "function"}]<|im_end|>')
    assert out.endswith("<|im_assistant|>assistant<|im_middle|><think>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   thinking=False)[-2:] == [BASE + 22, BASE + 23]


def test_split_long_text_cuts_runs():
    text = "a" * 60_000 + " " * 30_000 + "b"
    pieces = list(split_long_text(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_000 + 25_000, 5_000 + 1]
    assert [len(p) for p in split_long_text("ab " * 300_000)] == [400_000, 400_000, 100_000]


def test_eos_merged_from_config_and_generation_config(tmp_path, tik_dir):
    path = tmp_path / "ckpt"
    shutil.copytree(tik_dir[0], path)
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k25", "text_config": {"eos_token_id": 7}}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, BASE + 2]}))
    assert load_tokenizer(path, eos_token_ids=9).eos_token_ids == {7, 8, 9, BASE + 1, BASE + 2}


def test_tokenizer_json_with_kimi_k2_config(tmp_path, capfd):
    """kimi_k2 is unknown to transformers: the config must not be read, and no question asked."""
    eos = write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "eos_token_id": eos[0],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}))
    (tmp_path / "configuration_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos[1]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == set(eos)
    assert type(tok.detokenizer).__name__ == "ExactBPEStreamingDetokenizer"  # mlx-lm's byte-level one, byte 0 fixed
    assert tok.decode(tok.encode("héllo 世界")) == "héllo 世界"
    out, err = capfd.readouterr()
    assert "custom code" not in out + err


def test_auto_map_naming_the_source_repository(tmp_path, tik_dir):
    """MLX conversions keep the tokenizer as transformers saves it again, with the repo in auto_map."""
    path = tmp_path / "converted"
    shutil.copytree(tik_dir[0], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["moonshotai/Kimi-K2-Instruct--tokenization_kimi.TikTokenTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert type(load_tokenizer(path).detokenizer).__name__ == "ByteStreamingDetokenizer"


def test_refuses_what_it_cannot_read_exactly(tmp_path, tik_dir):
    with pytest.raises(ValueError, match=r"Found: no tokenizer files"):
        load_tokenizer(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(tik_dir[0], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_other.OtherTokenizer", None]}
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Found: chat_template.jinja, .*tiktoken.model.*TikTokenTokenizer"):
        load_tokenizer(other)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tik_dir[0], mismatched)
    lines = (mismatched / "tiktoken.model").read_text().splitlines()
    (mismatched / "tiktoken.model").write_text("\n".join(lines[:-10]) + "\n")  # ranks of another vocabulary
    with pytest.raises(ValueError, match=r"outside the special ids .* do not belong together"):
        load_tokenizer(mismatched)
    (mismatched / "tiktoken.model").write_text("\n".join(lines[:-10] + ["not base64 at all!"]))
    with pytest.raises(ValueError, match=r"line 759 is not `base64-token rank`"):
        KimiTokenizer(mismatched)
