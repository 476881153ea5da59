"""The ``fedge`` console script: the host CLI, or one clear line where the host tools are absent.

``fedge`` and ``fedge-agent`` come from one distribution, so a device-only install
(``pip install 'fedge[device]'``) has a ``fedge`` script too; without the ``sdk``
extra it says what to install instead of dying with an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys

_HOST_MODULES = ("click", "torch", "onnx")


def main() -> None:
    """Console-script entry point."""
    # find_spec does not import: checking torch this way costs nothing
    missing = [name for name in _HOST_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"fedge: the host tools need the 'sdk' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'fedge[sdk]' (on a device, use fedge-agent)",
            file=sys.stderr,
        )
        sys.exit(2)
    from sdk.cli.main import main as cli_main

    cli_main()
