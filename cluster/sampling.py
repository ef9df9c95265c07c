"""Sampling defaults: what the checkpoint's generation_config.json recommends, for the CLI and the
API alike; greedy where it says nothing."""

import json
from pathlib import Path

DEFAULTS = {"temperature": 0.0, "top_p": 0.0, "top_k": 0}


def generation_defaults(checkpoint_dir) -> dict:
    """{temperature, top_p, top_k} from generation_config.json (do_sample false means greedy)."""
    try:
        config = json.loads((Path(checkpoint_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("do_sample") is False:
        return dict(DEFAULTS)
    out = dict(DEFAULTS)
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
        if isinstance(config.get(name), (int, float)) and not isinstance(config.get(name), bool):
            out[name] = kind(config[name])
    return out


def with_defaults(params, defaults: dict):
    """A copy of SamplingParams with the fields the client left unset taken from `defaults`."""
    out = type(params)()
    out.CopyFrom(params)
    for name, value in defaults.items():
        if not out.HasField(name):
            setattr(out, name, value)
    return out
