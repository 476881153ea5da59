"""The committed broker_config/ example is exactly what the renderer makes of its topology.toml.

Refresh it after changing the renderer with:
``python -m sdk.broker_config render-examples --topology broker_config/topology.toml --out broker_config``
"""

from __future__ import annotations

import re
from pathlib import Path

from sdk.broker_config.render import BRIDGE_PASSWORD_PLACEHOLDER, EXAMPLE_DEPLOY_DIR, render_example_files
from sdk.broker_config.topology import load_topology

EXAMPLES = Path(__file__).resolve().parents[3] / "broker_config"
HAND_WRITTEN = {"README.md", "topology.toml"}
_HASH = re.compile(r"\$7\$\d+\$[A-Za-z0-9+/]{16}\$")


def _committed() -> dict[str, str]:
    return {
        str(p.relative_to(EXAMPLES)): p.read_text(encoding="utf-8")
        for p in EXAMPLES.rglob("*") if p.is_file()
    }


def test_committed_examples_match_a_fresh_render() -> None:
    rendered = {str(f.path): f.text for f in render_example_files(load_topology(EXAMPLES / "topology.toml"))}
    committed = _committed()
    assert set(committed) - HAND_WRITTEN == set(rendered)
    for path, text in rendered.items():
        assert committed[path] == text, f"broker_config/{path} is stale; rerun render-examples"


def test_committed_examples_hold_no_secrets_or_local_paths() -> None:
    for path, text in _committed().items():
        assert not _HASH.search(text) and "PRIVATE KEY" not in text, path
        for line in text.splitlines():
            if line.startswith("remote_password "):
                assert line == f"remote_password {BRIDGE_PASSWORD_PLACEHOLDER}", path
        if path in HAND_WRITTEN:
            continue
        for absolute in re.findall(r"(?<![\w.+])/[\w./-]+", text):
            assert absolute.startswith(f"{EXAMPLE_DEPLOY_DIR}/"), f"{path}: {absolute}"
