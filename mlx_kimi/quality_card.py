"""A conversion's quality card (OUT/quality.json): per part and module kind, the relative error of
the quantized outputs against the master's on the same calibration inputs, and the bits chosen.

Errors are ||quantized output - master output|| / ||master output|| over every calibration token:
for a decoder layer per sublayer kind (attention; the dense MLP, or the routed experts and the
shared experts, all on the same post-attention input) and for the layer's two sublayers together;
for the embedding the looked-up rows, for lm_head the logits. Routed experts the calibration set
never reached are named ("never_routed"), and those that got too few tokens for GPTQ and were
rounded to nearest ("rtn_experts").
"""

import json
from pathlib import Path

from .checkpoint import _ranges

CARD_FILE = "quality.json"


def build_card(entries: list, calibration: dict) -> dict:
    """The card from the streamed pass's per-part entries (calibrate.Calibration.card())."""
    layers = [e for e in entries if isinstance(e["part"], int)]
    errors = [e["output_error"]["layer"] for e in layers]
    return {
        "calibration": calibration,
        "parts": entries,
        "summary": {
            "mean_layer_error": sum(errors) / len(errors) if errors else 0.0,
            "worst_layer": max(layers, key=lambda e: e["output_error"]["layer"])["part"] if layers else None,
            "never_routed": {str(e["part"]): e["never_routed"] for e in layers if e.get("never_routed")},
            "rtn_experts": {str(e["part"]): e["rtn_experts"] for e in layers if e.get("rtn_experts")},
            "gptq_modules": sum(e["gptq"] for e in entries),
        },
    }


def write_card(out, card: dict) -> Path:
    path = Path(out) / CARD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2))
    tmp.replace(path)
    return path


def read_card(out) -> dict:
    return json.loads((Path(out) / CARD_FILE).read_text())


def card_rows(card: dict) -> list:
    """(part, module kind, bits, relative error, note) rows for a table, in model order."""
    rows = []
    for e in card["parts"]:
        label = {"embed": "embedding", "head": "lm_head"}.get(e["part"], f"layer {e['part']}")
        for kind, error in e["output_error"].items():
            note = ""
            if kind == "experts":
                notes = []
                if e.get("never_routed"):
                    notes.append(f"never routed: {_ranges(e['never_routed'])}")
                if e.get("rtn_experts"):
                    notes.append(f"too few tokens for GPTQ: {_ranges(e['rtn_experts'])}")
                note = "; ".join(notes)
            bits = ", ".join(e["bits"].get(kind, [])) if kind != "layer" else ""
            rows.append((label, kind, bits, error, note))
    return rows


def bits_label(quant) -> str:
    return f"{quant['bits']}-bit g{quant['group_size']}" if quant else "float"
