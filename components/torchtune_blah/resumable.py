"""JSONL files: reading them with errors that name the line, and an output that survives being
killed (one row per item, written in fixed batches).

``blah_eval`` and ``blah_generate`` answer questions in batches and append each finished batch
to their ``.jsonl`` file (flushed and fsynced). A rerun keeps the rows of batches that were
written completely, rewrites the file with exactly those (atomically: a torn last line or a
partial batch disappears), and answers the rest. The batches are fixed over the item order, so
a resumed run pads and decodes every batch exactly as an uninterrupted one would.
"""

import json
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

from torchtune_blah.checkpointing import atomic_text


def jsonl(rows: Iterable[Dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl_objects(path: str, error: Type[Exception] = ValueError,
                       label: str = "") -> Iterator[Tuple[int, Mapping[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a line that is not a
    JSON object raises ``error`` naming the line (``label`` goes before it, e.g. the config key)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{label}line {n} of {path}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where} is not JSON ({e.msg})") from None
            if not isinstance(row, Mapping):
                raise error(f"{where} must be a JSON object")
            yield n, row


def read_json(path: str, what: str) -> Any:
    """A JSON file that this project wrote; one that is damaged is refused naming it and what it is."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
        raise ValueError(f"{path} ({what}) is not valid JSON: {e}; restore it, or delete it and make it "
                         "again") from None


def check_settings(path: str, settings: Dict[str, Any], what: str) -> None:
    """An output folder holds one set of settings (``path``: its settings file); a rerun that
    would resume with other settings is refused, naming the keys that differ. An output_dir that
    is a file, or a settings file that is not JSON, is refused naming it."""
    folder = os.path.dirname(path) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"output_dir {folder} is a file, not a folder: choose a folder for the outputs")
    if not os.path.isfile(path):
        return
    previous = read_json(path, f"the settings of the {what} in {folder}")
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise ValueError(f"{os.path.dirname(path)} holds {what} with other settings ({changed}); choose another "
                         "output_dir to keep both")


class ResumableJsonl:
    """Rows keyed by ``id``, for ``items`` (objects with an ``id``) in batches of ``batch_size``.

    ``shard=(rank, world_size)``: this file holds every ``world_size``-th batch from ``rank`` on
    (data-parallel evaluation); the batches are the same as without sharding.
    ``upgrade(row, item)``: the row, as read from the file, in today's shape (rows written by an
    earlier version; ``torchtune_blah.prediction.upgrade_row``).
    """

    def __init__(self, path: str, items: Sequence[Any], batch_size: int, shard: Tuple[int, int] = (0, 1),
                 upgrade: Optional[Callable[[Mapping[str, Any], Any], Dict[str, Any]]] = None):
        self.path = path
        self._upgrade = upgrade or (lambda row, item: dict(row))
        rank, world_size = shard
        batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
        self.batches: List[List[Any]] = batches[rank::world_size]
        self.items = [x for batch in self.batches for x in batch]
        self.done: Dict[str, Dict[str, Any]] = self._complete_batches()

    def _complete_batches(self) -> Dict[str, Dict[str, Any]]:
        rows = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line: the batch it belongs to is redone
                    rows[row["id"]] = row
        complete = {}
        for batch in self.batches:
            if all(x.id in rows for x in batch):
                complete.update({x.id: self._upgrade(rows[x.id], x) for x in batch})
        return complete

    def open_append(self):
        """The file opened for appending, after rewriting it (atomically) with the complete batches only."""
        atomic_text(jsonl(self.done[x.id] for x in self.items if x.id in self.done), self.path)
        return open(self.path, "a", encoding="utf-8")

    def todo(self) -> List[List[Any]]:
        return [b for b in self.batches if not all(x.id in self.done for x in b)]

    def append(self, out, rows: List[Dict[str, Any]]) -> None:
        """Write one finished batch to ``out`` (from ``open_append``) and make it durable."""
        out.write(jsonl(rows))
        out.flush()
        os.fsync(out.fileno())
        self.done.update({r["id"]: r for r in rows})

    def rows(self) -> List[Dict[str, Any]]:
        """Every row, in item order (all batches must be done)."""
        return [self.done[x.id] for x in self.items]

    def complete(self) -> bool:
        return all(x.id in self.done for x in self.items)
