"""The `fedge` CLI loads host-heavy libraries only for the commands that use them.

Every aggregator process is `fedge aggregator`: what `sdk.cli.main` imports is memory each one carries
(aiohttp + matplotlib alone were ~50 MB per aggregator, docs/scale.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "onnx", "matplotlib", "aiohttp", "sklearn", "onnxscript")


def test_loading_the_cli_and_the_aggregator_services_imports_no_heavy_library():
    code = ("import json, sys; import sdk.cli.main, sdk.aggregator.regional_service, sdk.aggregator.root_service; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
