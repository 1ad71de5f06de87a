"""Crash-safe storage of finished search trees: rows written in shards as problems finish, read back on re-runs.

Layout under the generator's `output_dir`:

    run.json                 what the trees depend on (settings, model, problems); a re-run must match it
    shards/rank000-<run>-00000.jsonl   one JSON row per finished problem ("index" = its row in the input)

Each shard is written to a temporary name and renamed, so a `kill -9` leaves only whole shards behind. Rows are
keyed by problem index, and trees depend only on (settings, model, problem), so it does not matter which process
or which run wrote a row.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Callable


class ShardStore:
    """Finished rows of one process, flushed every `shard_size` rows (and on `flush`)."""

    def __init__(self, output_dir: str, fingerprint: dict, rank: int = 0, shard_size: int = 64):
        self.output_dir = output_dir
        self.shard_dir = os.path.join(output_dir, "shards")
        self.rank = rank
        self.shard_size = shard_size
        self.run_id = uuid.uuid4().hex[:8]
        self.sequence = 0
        self.buffer: list[dict] = []
        os.makedirs(self.shard_dir, exist_ok=True)
        self._check_or_write_manifest(fingerprint)

    def _check_or_write_manifest(self, fingerprint: dict) -> None:
        path = os.path.join(self.output_dir, "run.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
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
        """Every finished row on disk (all processes, all earlier runs), by problem index; `transform` is applied
        to each row as it is read (e.g. to drop the trees, holding one at a time)."""
        rows: dict[int, dict] = {}
        for path in sorted(glob.glob(os.path.join(self.shard_dir, "*.jsonl"))):
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    if row["index"] not in rows:
                        rows[row["index"]] = transform(row) if transform is not None else row
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
