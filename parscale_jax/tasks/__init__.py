"""Small downstream tasks of our own for the lm-evaluation-harness (`parscale-jax eval --tasks`): each
a YAML task file and its examples as JSON lines, shipped with the package, so they run on a machine
that cannot reach the Hugging Face hub. `scripts/make_tasks.py` writes the JSON lines.

- `shakespeare_mc`: which line comes next in a passage of the held-out plays (4 choices)
- `facts_qa`: short world facts, the true completion against 3 wrong ones (4 choices)
- `facts_gen`: the same facts, answered by greedy generation (exact match, up to case, spaces and
  punctuation, of what comes before the first line break, full stop or comma)

The YAML files read their examples with `load_jsonl` (`custom_dataset`), which finds a relative
`data_file` next to itself: the tasks work wherever the package is installed, from any directory.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).parent


def load_jsonl(data_file: str, split: str = "test", **_metadata):
    """{split: the examples of `data_file`} as the harness's `custom_dataset` (a `datasets.DatasetDict`);
    a relative path is one of the files shipped here."""
    import datasets

    path = Path(data_file)
    if not path.is_absolute():
        path = TASKS_DIR / path
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
