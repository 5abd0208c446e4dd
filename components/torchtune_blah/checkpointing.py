"""Atomic files and the resumable state of a training phase.

Every file a run writes goes through ``atomic_write``: written beside its final
name, flushed, fsynced, then renamed over it. A run killed at any moment leaves
either the previous file or the new one, never half of one, so a resumed run
never mistakes a torn file for a checkpoint.

The files' names and the run's layout are ``torchtune_blah.run_dir``'s. (torch is imported by the
functions that need it: the review tool writes its files atomically without torch's 2 s import.)
"""

import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional

from torchtune_blah.run_dir import PHASE_COMPLETE_FILE, TRAINING_STATE_FILE


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)``, then move the finished file to ``path`` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str) -> str:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str) -> str:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    return atomic_write(path, write)


def rng_state() -> Dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(phase_dir: str, state: Dict[str, Any]) -> str:
    return atomic_torch_save(state, os.path.join(phase_dir, TRAINING_STATE_FILE))


def load_training_state(phase_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(phase_dir, TRAINING_STATE_FILE)
    if not os.path.isfile(path):
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def mark_phase_complete(phase_dir: str, record: Dict[str, Any]) -> str:
    return atomic_json(record, os.path.join(phase_dir, PHASE_COMPLETE_FILE))


def atomic_text(text: str, path: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
