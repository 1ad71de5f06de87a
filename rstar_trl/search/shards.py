"""Crash-safe storage of finished search trees: rows written in shards as problems finish, read back on re-runs.

Layout under the generator's `output_dir`:

    run.json                 what the trees depend on (settings, model, problems); a re-run must match it
    shards/rank000-<run>-00000.jsonl   one JSON row per finished problem ("index" = its row in the input)

Each shard is written to a temporary name and renamed, so a `kill -9` leaves only whole shards behind. Rows are
keyed by problem index, and trees depend only on (settings, model, problem), so it does not matter which process
or which run wrote a row. A problem searched in several passes (`MCTSConfig.unsolved_rollouts`) has one row per
finished pass; its row with the highest `search_pass` is where it stands.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Callable


def pass_of(row: dict) -> int:
    """The search pass a saved row ended (rows saved before passes existed have no `search_pass`: pass 0)."""
    return row.get("search_pass", 0)


class ShardStore:
    """Finished rows of one process, flushed every `shard_size` rows (and on `flush`).

    `fingerprint` is what the rows depend on; a folder written with another is refused. `defaults` are the values of
    fingerprint keys added after some folders were written: a `run.json` without such a key was written with that
    value (so adding a setting does not refuse resuming folders searched before it existed)."""

    def __init__(self, output_dir: str, fingerprint: dict, rank: int = 0, shard_size: int = 64,
                 defaults: dict | None = None):  # fmt: skip
        self.output_dir = output_dir
        self.shard_dir = os.path.join(output_dir, "shards")
        self.rank = rank
        self.shard_size = shard_size
        self.run_id = uuid.uuid4().hex[:8]
        self.sequence = 0
        self.buffer: list[dict] = []
        os.makedirs(self.shard_dir, exist_ok=True)
        self._check_or_write_manifest(fingerprint, defaults or {})

    def _check_or_write_manifest(self, fingerprint: dict, defaults: dict) -> None:
        path = os.path.join(self.output_dir, "run.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = {**defaults, **json.load(f)}
            changed = {k: (previous.get(k), v) for k, v in fingerprint.items() if previous.get(k) != v}
            if changed:
                details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
                raise ValueError(
                    f"{self.output_dir} holds trees searched with other settings ({details}). Re-run with the "
                    "same settings to resume, or pick a new output_dir (or delete this one) to start over"
                )
            return
        tmp = f"{path}.{self.rank}.{self.run_id}.tmp"
        with open(tmp, "w") as f:
            json.dump(fingerprint, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def load(self, transform: Callable[[dict], dict] | None = None) -> dict[int, dict]:
        """Every finished row on disk (all processes, all earlier runs), by problem index: of a problem's rows, the
        one of its latest pass (highest `search_pass`). `transform` is applied to each row kept as it is read (e.g.
        to drop the trees, holding one at a time)."""
        rows: dict[int, dict] = {}
        passes: dict[int, int] = {}
        for path in sorted(glob.glob(os.path.join(self.shard_dir, "*.jsonl"))):
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    index, number = row["index"], pass_of(row)
                    if index not in passes or number > passes[index]:
                        passes[index] = number
                        rows[index] = transform(row) if transform is not None else row
        return rows

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"rank{self.rank:03d}-{self.run_id}-{self.sequence:05d}.jsonl"
        path = os.path.join(self.shard_dir, name)
        with open(path + ".tmp", "w") as f:
            for row in self.buffer:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self.sequence += 1
        self.buffer = []
