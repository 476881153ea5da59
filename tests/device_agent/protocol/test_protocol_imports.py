"""The wire protocol must load on a device: no torch, no onnx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODULES = ["candidate_request", "chunking", "envelope", "headers", "raw_keys", "receipts", "tensor_codec", "topics", "validation"]


def test_protocol_imports_without_torch_or_onnx() -> None:
    code = (
        "import sys\n"
        + "".join(f"import device_agent.protocol.{m}\n" for m in MODULES)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'sdk'))\n"
        + "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=Path(__file__).resolve().parents[3])
    assert result.stdout.strip() == ""
