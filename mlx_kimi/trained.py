"""The trained tiny Kimi shipped with the package (mlx_kimi/trained/, written by scripts/train_tiny.py):
a bf16 master in mlx-lm's names with its Kimi tokenizer, which `make-tiny --trained` writes in any
layout. trained.json records how it was trained and its held-out perplexity."""

import json
from pathlib import Path

import mlx.core as mx

from .kimi_tokenizer import TIKTOKEN_FILE, read_tiktoken_ranks
from .tiny import Master, TinyShape

TRAINED_DIR = Path(__file__).parent / "trained"
RECORD_FILE = "trained.json"


def trained_record(path: Path = TRAINED_DIR) -> dict:
    return json.loads((Path(path) / RECORD_FILE).read_text())


def load_trained(path: Path = TRAINED_DIR) -> Master:
    path = Path(path)
    if not (path / RECORD_FILE).exists():
        raise FileNotFoundError(f"{path} holds no trained model ({RECORD_FILE} missing): run "
                                f"scripts/train_tiny.py {path}, or reinstall kimi-cluster")
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return Master(TinyShape(**trained_record(path)["shape"]), weights, read_tiktoken_ranks(path / TIKTOKEN_FILE))
