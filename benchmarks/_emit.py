"""Shared by the benchmark scripts (it imports nothing of dizoo_imgcls, so the stock runner may use it)."""
import json
from typing import Optional


def emit(result: dict, out: Optional[str], indent: Optional[int] = None) -> int:
    """Print ``result`` as JSON on stdout (the benchmark's one output) and write it to ``out`` when given."""
    text = json.dumps(result, indent=indent)
    if out:
        with open(out, 'w') as f:
            f.write(text + '\n')
    print(text, flush=True)
    return 0
