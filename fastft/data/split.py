"""The held-out split: which rows ``data.eval_fraction`` holds out (one rule for every path: the
batched build, the per-example reference and preference data), and writing a split's rows to disk.

    held, train = held_out_split(1000, 0.05, seed=3407, source="data.jsonl")   # 50 and 950 indices
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .bundle import DataError

SPLIT_ROWS = 16384  # rows gathered and written at a time into a split


def held_out_split(n: int, fraction: float, seed: int, source: str):
    """(held-out indices in their shuffled order, training indices ascending) of ``n`` rows: a
    shuffle seeded by ``seed`` (train.seed), at least one row held out and at least one left to
    train on. Both are numpy int64 arrays (a list of a million Python ints is ~36 MB, the array 8)."""
    import numpy as np

    order = np.arange(n)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"{source}: {n} rows leave none for training after holding out "
                        f"data.eval_fraction={fraction}; add rows or lower the fraction")
    held = order[:n_eval].copy()
    del order
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return held, np.flatnonzero(mask)


def write_split(rows, idx, folder: Path, fingerprint: str, update=lambda n: None) -> None:
    """Rows ``idx`` of ``rows`` (a ``fastft.data.rows.RowStore``; input_ids, labels) into ``folder`` in
    the layout ``datasets.Dataset.save_to_disk`` writes and ``datasets.load_from_disk`` reads (one
    Arrow stream file ``data-00000-of-00001.arrow`` with the features in its schema metadata,
    ``state.json``, ``dataset_info.json``), ``SPLIT_ROWS`` rows at a time, dropping the source's
    mapped pages from the resident set after each: memory stays flat however long the split is."""
    import datasets
    import numpy as np
    import pyarrow as pa

    features = datasets.Features({c: datasets.List(datasets.Value("int32")) for c in ("input_ids", "labels")})
    schema = features.arrow_schema
    folder.mkdir(parents=True)
    data_file = "data-00000-of-00001.arrow"
    idx = np.asarray(idx, dtype=np.int64)
    with pa.OSFile(str(folder / data_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(idx), SPLIT_ROWS):
            part = rows.gather(idx[start:start + SPLIT_ROWS], ["input_ids", "labels"])
            writer.write_table(part.replace_schema_metadata(schema.metadata))
            rows.release()
            update(part.num_rows)
    datasets.DatasetInfo(features=features).write_to_directory(str(folder))
    state = {"_data_files": [{"filename": data_file}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
