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


def public_path(out: Path) -> Path:
    """Where the public key of private key ``out`` goes: ``NAME.key`` -> ``NAME.pub``, anything else -> ``OUT.pub``.

    So ``--out eu-dev-0001.key`` gives ``eu-dev-0001.pub``, the file name an
    aggregator's registry reads as device ``eu-dev-0001``.
    """
    return out.with_suffix(".pub") if out.suffix == ".key" else out.with_name(out.name + ".pub")


@keys.command("generate", epilog=examples("fedge keys generate --out fleet.key                    # fleet.key, fleet.pub",
                                          "fedge keys generate --out devices/eu-dev-0001.key      # registry entry eu-dev-0001.pub",
                                          "fedge keys generate --kind encryption --out eu-agg.x25519   # eu-agg.x25519.pub"))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Private key path; the public key goes to NAME.pub for OUT = NAME.key, else to OUT.pub.")
@click.option("--kind", type=click.Choice(["signing", "encryption"]), default="signing", show_default=True,
              help="signing: Ed25519 (fleet, root, devices); encryption: X25519 (aggregator recipients).")
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def generate(out: Path, kind: str, force: bool) -> None:
    """Generate a key pair: OUT (0600, PEM) and its public key (NAME.pub for OUT = NAME.key, else OUT.pub)."""
    pub = public_path(out)
    if out.suffix == ".pub":
        raise InputError(f"--out {out}: that is a public key's name; give the private key's (e.g. {out.with_suffix('.key')})")
    for path in (out, pub):
        if path.exists() and not force:
            raise InputError(f"--out {out}: {path} exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate() if kind == "signing" else X25519PrivateKey.generate()
    try:
        save_private_key(key, out)
        save_public_key(key.public_key(), pub)
    except OSError as exc:
        raise write_error("--out", out, exc) from exc
    click.echo(f"{kind} key {key_id(key.public_key())}: {out} (private), {pub} (public)")
