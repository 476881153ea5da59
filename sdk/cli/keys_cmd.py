"""``fedge keys``: fleet and device key pairs."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.keys import key_id, save_private_key, save_public_key
from sdk.cli.family import InputError, examples, write_error


@click.group()
def keys() -> None:
    """Create signing (Ed25519) and encryption (X25519) key pairs."""


@keys.command("generate", epilog=examples("fedge keys generate --out fleet.key",
                                          "fedge keys generate --kind encryption --out eu-agg.x25519"))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Private key path; the public key goes to OUT.pub.")
@click.option("--kind", type=click.Choice(["signing", "encryption"]), default="signing", show_default=True,
              help="signing: Ed25519 (fleet, root, devices); encryption: X25519 (aggregator recipients).")
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def generate(out: Path, kind: str, force: bool) -> None:
    """Generate a key pair: OUT (0600, PEM) and OUT.pub."""
    if out.exists() and not force:
        raise InputError(f"--out {out}: exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate() if kind == "signing" else X25519PrivateKey.generate()
    pub = out.with_name(out.name + ".pub")
    try:
        save_private_key(key, out)
        save_public_key(key.public_key(), pub)
    except OSError as exc:
        raise write_error("--out", out, exc) from exc
    click.echo(f"{kind} key {key_id(key.public_key())}: {out} (private), {pub} (public)")
