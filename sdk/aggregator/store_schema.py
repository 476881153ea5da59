"""The aggregator store's SQL schema and its migrations (the store itself is :mod:`sdk.aggregator.store`).

Version 3 adds each contributor's bounded weight to ``contributors`` (a
middle tier lists its children's devices, with their weights, in its own
aggregate); rows written before it have none (NULL). Version 2 adds, to version 1: each round's influence bounds (``clip_norm``,
``weight_cap``), the nonce of the sealed aggregate and the tier above's
signed answer to it (``forward_receipt``, ``forward_status``), each accepted
update's raw L2 norm, and the root's ``contributors`` table (which region
counted which device in which round). A version-1 file is upgraded in
place, in one transaction, the first time this code opens it; a round in
progress at the upgrade continues under its tier's first-round bounds.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS round_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    round INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('collecting', 'closed')),
    global_params BLOB NOT NULL,
    base_params BLOB NOT NULL,
    model_blob BLOB NOT NULL,
    closed_mean BLOB,
    closed_updates INTEGER,
    closed_samples INTEGER,
    closed_params BLOB,
    closed_blob BLOB,
    clip_norm REAL,
    weight_cap INTEGER,
    closed_nonce BLOB,
    forward_receipt BLOB,
    forward_status TEXT
);
CREATE TABLE IF NOT EXISTS partial_sums (
    member TEXT NOT NULL,
    round INTEGER NOT NULL,
    count INTEGER NOT NULL,
    total_weight REAL NOT NULL,
    samples INTEGER NOT NULL,
    sums BLOB NOT NULL,
    PRIMARY KEY (member, round)
);
CREATE TABLE IF NOT EXISTS accepted (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    round INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    digest BLOB NOT NULL,
    sample_count INTEGER NOT NULL,
    weight REAL NOT NULL,
    member TEXT NOT NULL,
    delta BLOB,
    norm REAL,
    UNIQUE (sender, round, nonce),
    UNIQUE (sender, round)
);
CREATE TABLE IF NOT EXISTS contributors (
    round INTEGER NOT NULL,
    device TEXT NOT NULL,
    region TEXT NOT NULL,
    weight INTEGER,
    PRIMARY KEY (round, device)
);
CREATE TABLE IF NOT EXISTS replay_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL)
"""

_FROM_1 = (
    "ALTER TABLE round_state ADD COLUMN clip_norm REAL",
    "ALTER TABLE round_state ADD COLUMN weight_cap INTEGER",
    "ALTER TABLE round_state ADD COLUMN closed_nonce BLOB",
    "ALTER TABLE round_state ADD COLUMN forward_receipt BLOB",
    "ALTER TABLE round_state ADD COLUMN forward_status TEXT",
    "ALTER TABLE accepted ADD COLUMN norm REAL",
)
_FROM_2 = ("ALTER TABLE contributors ADD COLUMN weight INTEGER",)


def create_or_migrate(conn: sqlite3.Connection, stored_version: str | None) -> None:
    """Create the schema (``stored_version`` None: a new file) or upgrade it; the caller holds a write transaction.

    Unknown versions are left alone: the caller compares the result with :data:`SCHEMA_VERSION`.
    """
    if stored_version == "1":
        for statement in _FROM_1:
            conn.execute(statement)
    if stored_version == "2":
        for statement in _FROM_2:
            conn.execute(statement)
    if stored_version in ("1", "2"):
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    if stored_version in (None, "1"):
        for statement in SCHEMA.strip().split(";\n"):
            conn.execute(statement)
