"""`--model` as mlx-lm users write it: a directory, or a Hugging Face repo id found in the local
Hugging Face cache (huggingface_hub's layout: HF_HUB_CACHE, else HF_HOME/hub). Nothing is downloaded.
"""

import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"^models--(.+?)--(.+)$")


def looks_like_repo_id(model: str) -> bool:
    """`org/name`, not a path someone meant as one (./x, /x, ~/x, a/b/c)."""
    return bool(_REPO_ID.match(model)) and not model.startswith((".", "~"))


def download_advice(repo_id: str) -> str:
    return (f"download it first, into the Hugging Face cache: `hf download {repo_id}` (or in Python "
            f"`huggingface_hub.snapshot_download(\"{repo_id}\")`), or into a directory: "
            f"`hf download {repo_id} --local-dir {repo_id.split('/')[-1]}` and pass that directory")


def resolve_model_dir(model) -> Path:
    """The directory `model` names: itself when it exists (or is no repo id), else the cached snapshot
    of the repo id. Raises FileNotFoundError naming the download command when the repo is not cached."""
    path = Path(model).expanduser()
    if path.exists() or not looks_like_repo_id(str(model)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS  # the files mlx-lm fetches: a snapshot needs only those

    try:
        return Path(snapshot_download(str(model), local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except IncompleteSnapshotError as e:
        raise FileNotFoundError(f"{model}: the snapshot in the local Hugging Face cache ({HF_HUB_CACHE}) is "
                                f"incomplete ({e}); finish the download: `hf download {model}`") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{model}: not a directory, and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"{download_advice(str(model))}. kimi-cluster never downloads weights itself."
        ) from None


def repo_name(path: Path) -> str:
    """`org/name` for a snapshot directory of the Hugging Face cache, else the directory's name."""
    if path.parent.name == "snapshots" and (m := _CACHE_SNAPSHOT.match(path.parent.parent.name)):
        return f"{m.group(1)}/{m.group(2)}"
    return path.name
