"""What the streamed calibration pass keeps between parts and between runs: after each part, the
hidden states it passes on, the measuring pass's amplification streams, and that part's card entry,
in OUT/.calibration/STAGE/, so an interrupted pass resumes at the next part."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from .calibration_set import CalibrationError


def card_to_json(card: dict) -> dict:
    errors = {m: [[list(c) if c else None, e] for c, e in cands.items()] for m, cands in card["errors"].items()}
    return {**card, "errors": errors}


def card_from_json(card: dict) -> dict:
    errors = {m: {tuple(c) if c else None: e for c, e in cands} for m, cands in card["errors"].items()}
    return {**card, "errors": errors}


class PartStore:
    """One calibration's saved states, one folder per stage ("measure", "quantize")."""

    def __init__(self, work: Path):
        self.work = Path(work)

    def path(self, stage: str, part) -> Path:
        return self.work / stage / f"after-{part}"

    def has(self, stage: str, part) -> bool:
        return self.path(stage, part).with_suffix(".json").exists()

    def card(self, stage: str, part) -> dict:
        return card_from_json(json.loads(self.path(stage, part).with_suffix(".json").read_text()))

    def load(self, stage: str, part, streams: bool = False) -> tuple:
        """(hidden states, card entry, the streams saved with them or None) saved after `part`."""
        path = self.path(stage, part)
        files = [path.with_suffix(".npy"), path.with_suffix(".json")]
        if streams:
            files.append(path.with_name(path.name + "-streams.npy"))
        if not all(f.exists() for f in files):
            raise CalibrationError(f"{path.parent}: the calibration state after part {part} is missing; delete "
                                   f"{self.work.parent} to start the conversion over")
        return (mx.array(np.load(files[0])), self.card(stage, part),
                mx.array(np.load(files[2])) if streams else None)

    def save(self, stage: str, part, hidden: mx.array, card: dict, streams: mx.array = None) -> None:
        path = self.path(stage, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {path.with_suffix(".npy"): hidden}
        if streams is not None:
            arrays[path.with_name(path.name + "-streams.npy")] = streams
        for file, array in arrays.items():  # the card last: it says the part is done
            np.save(file.with_name(file.name + ".tmp"), np.array(array), allow_pickle=False)
            file.with_name(file.name + ".tmp.npy").replace(file)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(card_to_json(card)))
        tmp.replace(path.with_suffix(".json"))

    def fresh(self, stage: str, key: dict) -> str:
        """The stage's folder, emptied if a run with another source or calibration set (`key`) left it."""
        folder = self.work / stage
        file = folder / "key.json"
        if folder.exists() and (not file.exists() or json.loads(file.read_text()) != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            file.write_text(json.dumps(key))
        return stage

    def drop_hidden(self, stage: str, files: str = "*.npy") -> None:
        for file in (self.work / stage).glob(files):
            file.unlink()
