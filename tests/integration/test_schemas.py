"""The committed contract matches the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ordertrail.api.schemas import stale_schemas
from tests.support import process_stderr

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = REPO_ROOT / "schemas"


def test_committed_schemas_are_current() -> None:
    # Rendering builds the app, which configures logging: keep it on fd 2.
    with process_stderr():
        stale = stale_schemas(SCHEMAS)

    assert stale == [], "run `make schemas` and commit the result"


@pytest.mark.slow
def test_schemas_render_the_same_in_every_process() -> None:
    # String hashing is seeded per process; a document built from a set or
    # frozenset would come out in another order in another process, and the
    # check above would pass or fail by chance.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ordertrail.api.schemas import stale_schemas\n"
        "print(','.join(stale_schemas(Path(sys.argv[1]))))\n"
    )
    stale_by_seed = {}
    for seed in ("0", "1", "2", "3"):
        finished = subprocess.run(
            [sys.executable, "-c", script, str(SCHEMAS)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        stale_by_seed[seed] = finished.stdout.strip()

    assert stale_by_seed == dict.fromkeys(stale_by_seed, "")
