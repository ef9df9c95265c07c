"""Slices of a checkpoint as files: what a node holds of a model it did not download whole.

A slice is made of parts: one per decoder layer, the embedding and the head. Each part is one
safetensors file whose header follows from its tensor list, so a part travels as its data bytes
alone, cut into chunks with a sha256 each (its `PartManifest`). A node's cache keeps, per model
identity, the parts it received, each beside its manifest; every part is checked against its
manifest before it is loaded, and a part cut short resumes with the chunks it lacks.

No networking here: cluster/transfer.py moves the chunks.
"""

import fcntl
import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (DTYPE_BYTES, INDEX_FILE, Checkpoint, CheckpointError, TensorInfo, read_safetensors_header,
                         safetensors_header, tensor_data_offsets, tensor_nbytes, tensor_part)

CHUNK_BYTES = 4 * 1024 * 1024
MODEL_FILE = "model.json"   # in a model's cache directory: its identity and name
_PARTIAL = ".partial"


def part_name(part) -> str:
    """A pipeline part (layer index, "embed" or "head") as a file stem."""
    return f"layer-{part:04d}" if isinstance(part, int) else part


def slice_parts(start: int, end: int, num_layers: int) -> list:
    """The part names a slice [start, end) is made of, in pipeline order."""
    parts = (["embed"] if start == 0 else []) + [part_name(i) for i in range(start, end)]
    return parts + (["head"] if end == num_layers else [])


@dataclass(frozen=True)
class PartManifest:
    name: str
    tensors: tuple        # (name, dtype, shape) in file order
    chunk_bytes: int
    chunks: tuple         # sha256 hex digest of each chunk of the data

    @property
    def data_bytes(self) -> int:
        return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in self.tensors)

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"

    def chunk_span(self, index: int) -> tuple:
        begin = index * self.chunk_bytes
        return begin, min(begin + self.chunk_bytes, self.data_bytes)

    def header(self) -> bytes:
        """The safetensors header (length prefix included) every copy of this part starts with."""
        return safetensors_header(self.tensors, {"format": "mlx"})[0]

    def to_json(self) -> dict:
        return {"name": self.name, "tensors": [[n, d, list(s)] for n, d, s in self.tensors],
                "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks)}

    @classmethod
    def from_json(cls, data: dict) -> "PartManifest":
        return cls(data["name"], tuple((n, d, tuple(s)) for n, d, s in data["tensors"]),
                   data["chunk_bytes"], tuple(data["chunks"]))

    def check(self) -> None:
        """Refuse a manifest whose numbers cannot describe a part (it comes from another node)."""
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise CheckpointError(f"part name {self.name!r} is not a file name")
        if any(dtype not in DTYPE_BYTES for _, dtype, _ in self.tensors):
            raise CheckpointError(f"part {self.name}: unknown dtype in its manifest")
        if self.chunk_bytes <= 0 or len(self.chunks) != -(-self.data_bytes // self.chunk_bytes):
            raise CheckpointError(f"part {self.name}: manifest has {len(self.chunks)} chunk digests for "
                                  f"{self.data_bytes} bytes in chunks of {self.chunk_bytes}")


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- reading parts out of a whole checkpoint ------------------------------------------------------

def _part_tensors(checkpoint: Checkpoint, name: str) -> list:
    parts = {part_name(i): i for i in range(checkpoint.num_layers)} | {"embed": "embed", "head": "head"}
    if name not in parts:
        raise CheckpointError(f"{checkpoint.path}: no part {name!r} in this model")
    want = parts[name]
    return sorted((t for t in checkpoint.tensors.values() if tensor_part(t.name, checkpoint.prefix) == want),
                  key=lambda t: t.name)


def _segments(checkpoint: Checkpoint, tensors: list) -> list:
    """(file, offset, nbytes) of each tensor's data, in part order."""
    starts = {}
    for t in tensors:
        if t.file not in starts:
            starts[t.file] = tensor_data_offsets(checkpoint.path / t.file)
    return [(checkpoint.path / t.file, starts[t.file][t.name], t.nbytes) for t in tensors]


def _read_span(segments: list, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of the concatenation of `segments`."""
    out, position = [], 0
    for path, offset, nbytes in segments:
        lo, hi = max(begin, position), min(end, position + nbytes)
        if lo < hi:
            with open(path, "rb") as f:
                f.seek(offset + lo - position)
                out.append(f.read(hi - lo))
        position += nbytes
        if position >= end:
            break
    data = b"".join(out)
    if len(data) != end - begin:
        raise CheckpointError(f"{segments[0][0]}: file shorter than its header says; copy it again")
    return data


class PartReader:
    """A part's data read straight from the files that hold it (a whole checkpoint or a cached part)."""

    def __init__(self, manifest: PartManifest, segments: list):
        self.manifest, self.segments = manifest, segments

    def chunk(self, index: int) -> bytes:
        return _read_span(self.segments, *self.manifest.chunk_span(index))


def checkpoint_part(checkpoint: Checkpoint, name: str, chunk_bytes: int = CHUNK_BYTES) -> PartReader:
    """A part of a whole checkpoint, hashed chunk by chunk (reads the part's bytes once)."""
    tensors = _part_tensors(checkpoint, name)
    segments = _segments(checkpoint, tensors)
    total = sum(t.nbytes for t in tensors)
    spec = PartManifest(name, tuple((t.name, t.dtype, t.shape) for t in tensors), chunk_bytes, ())
    chunks = tuple(digest(_read_span(segments, *spec.chunk_span(i))) for i in range(-(-total // chunk_bytes)))
    return PartReader(PartManifest(name, spec.tensors, chunk_bytes, chunks), segments)


def local_part(directory: Path, manifest: PartManifest) -> PartReader | None:
    """The part `manifest` describes, read from a checkpoint directory that holds all its tensors with
    the same dtypes and shapes (a full copy, or only some shards of one); None when it does not.
    Its bytes are still to be checked against the manifest's sha256s."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    try:
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {n: p.name for p in directory.glob("model*.safetensors") for n in read_safetensors_header(p)}
        segments, headers, offsets = [], {}, {}
        for name, dtype, shape in manifest.tensors:
            file = weight_map.get(name)
            if file is None or not (directory / file).exists():
                return None
            if file not in headers:
                headers[file] = read_safetensors_header(directory / file)
                offsets[file] = tensor_data_offsets(directory / file)
            if name not in headers[file] or headers[file][name][:2] != (dtype, tuple(shape)):
                return None
            segments.append((directory / file, offsets[file][name], headers[file][name][2]))
    except (OSError, ValueError, KeyError, CheckpointError):
        return None
    return PartReader(manifest, segments)


# ---- the cache ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedModel:
    model_id: str
    model_name: str
    path: Path
    parts: list        # complete part names
    bytes: int         # everything under the model's directory, partial parts included


class SliceCache:
    """Parts of models under `root/<model id>/<model name>/`: `<part>.safetensors` beside
    `<part>.json` (its manifest), `config.json`, and `<part>.safetensors.partial` while receiving."""

    def __init__(self, root):
        self.root = Path(root)

    def model_dir(self, model_id: str, model_name: str | None = None) -> Path:
        key = self.root / model_id[:32]
        if model_name is None:
            info = key / MODEL_FILE
            model_name = json.loads(info.read_text())["model_name"] if info.exists() else "model"
        return key / model_name

    def add_model(self, model_id: str, model_name: str, config: dict) -> Path:
        if not model_name or "/" in model_name or model_name.startswith("."):
            raise CheckpointError(f"model name {model_name!r} is not a directory name")
        path = self.model_dir(model_id, model_name)
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / "config.json", config)
        _write_json(path.parent / MODEL_FILE, {"model_id": model_id, "model_name": model_name})
        return path

    def manifest(self, model_id: str, name: str) -> PartManifest | None:
        """The manifest of a complete cached part (not yet verified), or None."""
        path = self.model_dir(model_id)
        if not (path / f"{name}.safetensors").exists() or not (path / f"{name}.json").exists():
            return None
        return PartManifest.from_json(json.loads((path / f"{name}.json").read_text()))

    def reader(self, model_id: str, name: str) -> PartReader | None:
        manifest = self.manifest(model_id, name)
        if manifest is None:
            return None
        path = self.model_dir(model_id) / manifest.file
        return PartReader(manifest, [(path, len(manifest.header()), manifest.data_bytes)])

    def verify(self, model_id: str, name: str) -> str | None:
        """Why a complete cached part is not what its manifest says (None when it is)."""
        manifest = self.manifest(model_id, name)
        if manifest is None:
            return "not in the cache"
        path = self.model_dir(model_id) / manifest.file
        header = manifest.header()
        if path.stat().st_size != len(header) + manifest.data_bytes:
            return f"{path}: {path.stat().st_size} bytes, its manifest says {len(header) + manifest.data_bytes}"
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                return f"{path}: header differs from its manifest"
            for i, want in enumerate(manifest.chunks):
                begin, end = manifest.chunk_span(i)
                if digest(f.read(end - begin)) != want:
                    return f"{path}: chunk {i} (bytes {begin}-{end} of the data) fails its sha256"
        return None

    def remove_part(self, model_id: str, name: str) -> None:
        path = self.model_dir(model_id)
        for suffix in (".safetensors", ".json", ".safetensors" + _PARTIAL):
            (path / f"{name}{suffix}").unlink(missing_ok=True)

    @contextmanager
    def receiving(self, model_id: str, manifest: PartManifest):
        """A `PartWriter` for a part, held under a lock so two nodes sharing the cache never write
        the same part at once."""
        manifest.check()
        path = self.model_dir(model_id)
        with open(path / f".{manifest.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            writer = PartWriter(path, manifest)
            try:
                yield writer
            finally:
                writer.close()

    def checkpoint(self, model_id: str, names: list, receiving: dict | None = None) -> Checkpoint:
        """The cached parts `names` as a Checkpoint that load_slice reads: complete ones, and those
        `receiving` (part name -> manifest) holds the manifests of, still being received."""
        path = self.model_dir(model_id)
        config = json.loads((path / "config.json").read_text())
        prefix = "language_model." if config.get("model_type") == "kimi_k25" else ""
        tensors = {}
        for name in names:
            manifest = (receiving or {}).get(name) or self.manifest(model_id, name)
            if manifest is None:
                raise CheckpointError(f"{path}: part {name} is not in the cache")
            for tname, dtype, shape in manifest.tensors:
                if not tname.startswith(prefix):
                    raise CheckpointError(f"{path / manifest.file}: tensor {tname!r} outside the text model")
                tensors[tname] = TensorInfo(tname, manifest.file, dtype, shape, tensor_nbytes(dtype, shape))
        return Checkpoint(path, config, tensors, model_id)

    def model_bytes(self, model_id: str) -> int:
        """What one model takes in the cache (0 when it is not there)."""
        key = self.root / model_id[:32]
        return sum(f.stat().st_size for f in key.rglob("*") if f.is_file()) if key.is_dir() else 0

    def models(self) -> list:
        out = []
        for info in sorted(self.root.glob(f"*/{MODEL_FILE}")):
            data = json.loads(info.read_text())
            path = info.parent / data["model_name"]
            parts = sorted(p.stem for p in path.glob("*.safetensors") if (path / f"{p.stem}.json").exists())
            out.append(CachedModel(data["model_id"], data["model_name"], path, parts,
                                   self.model_bytes(data["model_id"])))
        return out

    def prune(self, keep_model_ids=()) -> list:
        """Delete every cached model but `keep_model_ids` (id prefixes); returns what was deleted."""
        gone = [m for m in self.models() if not any(m.model_id.startswith(k) for k in keep_model_ids)]
        for m in gone:
            shutil.rmtree(m.path.parent)
        return gone


class PartWriter:
    """Receives one part's chunks, in any order (several sources may send different chunks at once),
    into `<part>.safetensors.partial`, which has the part's full size from the start: each chunk is
    checked against its sha256 before it is written at its own offset. complete() puts the file in
    place with its manifest."""

    def __init__(self, path: Path, manifest: PartManifest):
        self.manifest = manifest
        self.final = path / manifest.file
        self.partial = path / (manifest.file + _PARTIAL)
        self.header = manifest.header()
        self._lock = threading.Lock()
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        self.missing = self._resume()  # chunk indices not yet written and verified, ascending

    def _resume(self) -> list:
        """The chunks a partial file still lacks: each chunk it holds is checked again (a file cut
        short, or written out of order, keeps every chunk that matches its sha256)."""
        size = len(self.header) + self.manifest.data_bytes
        if os.pread(self._fd, len(self.header), 0) != self.header:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self.header, 0)
            os.ftruncate(self._fd, size)
            return list(range(len(self.manifest.chunks)))
        held = os.fstat(self._fd).st_size - len(self.header)
        os.ftruncate(self._fd, size)
        missing = []
        for i, want in enumerate(self.manifest.chunks):
            begin, end = self.manifest.chunk_span(i)
            if end > held or digest(os.pread(self._fd, end - begin, len(self.header) + begin)) != want:
                missing.append(i)
        return missing

    def verified_bytes(self) -> int:
        """Data bytes in the chunks written and verified so far."""
        missing = sum(self.manifest.chunk_span(i)[1] - self.manifest.chunk_span(i)[0] for i in self.missing)
        return self.manifest.data_bytes - missing

    @property
    def done(self) -> bool:
        return not self.missing

    def write(self, index: int, data) -> bool:
        """Write chunk `index` if it is still missing and matches its sha256; False when it does not.
        Safe to call from several threads at once (for different chunks)."""
        if not 0 <= index < len(self.manifest.chunks):
            return False
        begin, end = self.manifest.chunk_span(index)
        # hashlib releases the GIL on a large buffer: other chunks are received meanwhile.
        if len(data) != end - begin or digest(data) != self.manifest.chunks[index]:
            return False
        with self._lock:
            if index not in self.missing:
                return False
            self.missing.remove(index)
        # No fsync per chunk: a resume checks every chunk again.
        os.pwrite(self._fd, data, len(self.header) + begin)
        return True

    def close(self) -> None:
        os.close(self._fd)

    def complete(self) -> None:
        if not self.done:
            raise CheckpointError(f"{self.partial}: {len(self.manifest.chunks) - len(self.missing)} of "
                                  f"{len(self.manifest.chunks)} chunks received")
        os.fsync(self._fd)
        _write_json(self.final.with_suffix(".json"), self.manifest.to_json())
        os.replace(self.partial, self.final)


def _write_json(path: Path, data) -> None:
    # Nodes sharing one cache (several on one machine) may write the same file at once: each its own tmp.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
