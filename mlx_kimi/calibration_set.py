"""The calibration set: the token ids the streamed pass (calibrate.py) runs through the model.

Built in: code, prose, Chinese, and a chat with tools and thinking (rendered with the checkpoint's
own chat template); or the user's own text file.
"""

from pathlib import Path

import mlx.core as mx

from .kimi_tokenizer import load_tokenizer
from .sources import ConvertError

DEFAULT_TOKENS = 1024
SEQUENCE = 128  # tokens per calibration sequence

# The built-in calibration set: code, prose, Chinese, and a chat with tools and thinking (rendered with
# the checkpoint's own chat template). Its words are not quality.DEFAULT_TEXT's, on which `compare` judges.
CODE = '''
import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)


def schedule(jobs: list[Job], workers: int) -> dict[str, int]:
    """Assign each job to the least loaded worker, highest priority first."""
    loads = [(0, w) for w in range(workers)]
    heapq.heapify(loads)
    placed = {}
    for job in sorted(jobs, reverse=True):
        load, worker = heapq.heappop(loads)
        placed[job.name] = worker
        heapq.heappush(loads, (load + job.priority, worker))
    return placed


fn parse_header(bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    let len = u64::from_le_bytes(bytes[..8].try_into().map_err(|e| format!("{e}"))?);
    Ok((len, &bytes[8..8 + len as usize]))
}

SELECT city, COUNT(*) AS orders, SUM(total) FROM sales WHERE year = 2024 GROUP BY city ORDER BY 3 DESC;
'''
PROSE = (
    "The river had frozen early that winter, and the ferryman spent his mornings mending nets by the stove. "
    "Merchants crossed on foot, testing the ice with long poles; by February a market had grown on it, with "
    "stalls selling chestnuts, wool and salted fish. Historians still argue whether the thaw of 1816 was "
    "caused by a volcano half a world away, but the ledgers of the town record only that the price of flour "
    "doubled in a week and that the bridge, finished the following summer, cost 12,400 florins. "
    "Photosynthesis converts light, water and carbon dioxide into glucose and oxygen; chlorophyll absorbs red "
    "and blue light and reflects green, which is why leaves look the colour they do. "
)
CHINESE = (
    "春天来了，山上的桃花开得正好。村里的孩子们放学以后总喜欢跑到河边，看渔夫把船划回码头。"
    "人工智能模型在量化以后体积变小，但精度也会下降，所以需要在校准数据上衡量每一层的误差。"
    "这座城市有三百万人口，地铁线路一共十二条，每天早上七点到九点是最拥挤的时候。"
)
CHAT = [
    {"role": "system", "content": "You are a careful assistant with access to tools."},
    {"role": "user", "content": "What's the weather in Hangzhou tomorrow, and should I bring an umbrella?"},
    {"role": "assistant", "reasoning_content": "The user wants tomorrow's forecast; call the weather tool first.",
     "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                    "function": {"name": "get_weather",
                                                 "arguments": '{"city": "Hangzhou", "day": "tomorrow"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0",
     "content": '{"high_c": 19, "low_c": 12, "rain_probability": 0.7}'},
    {"role": "assistant", "reasoning_content": "70% chance of rain: yes, an umbrella.",
     "content": "Tomorrow in Hangzhou: 12-19 °C with a 70% chance of rain, so yes, bring an umbrella."},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "day": {"type": "string"}},
                   "required": ["city"]}}}]


class CalibrationError(ConvertError):
    """A calibration set that cannot serve, with what it has and what was asked."""


def has_tokenizer(path) -> bool:
    return any((Path(path) / f).exists() for f in ("tiktoken.model", "tokenizer.json"))


def builtin_ids(tokenizer) -> list:
    ids = []
    for text in (CODE, PROSE, CHINESE):
        ids += tokenizer.encode(text)
    if getattr(tokenizer, "chat_template", None):
        ids += tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=True)
    return ids


def calibration_ids(tokenizer_dir, tokens: int = DEFAULT_TOKENS, file=None) -> mx.array:
    """(sequences, length) token ids: the first `tokens` of `file` (the user's text) or of the built-in
    set (repeated as often as it takes), encoded with the checkpoint's own tokenizer."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if file is not None:
        ids = tokenizer.encode(Path(file).read_text())
        if len(ids) < tokens:
            raise CalibrationError(f"{file}: {len(ids)} tokens with this checkpoint's tokenizer, but the calibration "
                                   f"set asked needs {tokens}; give a longer file or ask fewer tokens "
                                   "(--calibration-tokens)")
    else:
        one = builtin_ids(tokenizer)
        ids = one * -(-tokens // len(one))
    length = min(SEQUENCE, tokens)
    usable = tokens // length * length
    return mx.array(ids[:usable]).reshape(-1, length)
