"""``fedge release``: ship a bundle to the fleet over MQTT with a canary, see where it stands, stop or undo it.

docs/rollout.md is the design and the operator's walk-through; every command
takes the fleet directory ``fedge fleet init`` made.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from device_agent.release.release_info import ReleaseTargets, SharedStart, Stage, StageRecord
from sdk.cli.family import InputError, examples

if TYPE_CHECKING:
    from sdk.release.repository import ReleaseRepository

_FLEET = click.argument("fleet_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
_RELEASE = click.argument("release", type=click.IntRange(min=1))
_KEY_DIRS = click.option("--key-dir", "key_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                         help="Extra directory holding release role keys (offline root/targets keys); repeatable. "
                              "FLEET/keys/release is always searched.")
_REASON = click.option("--reason", default="operator", show_default=True, help="Why (kept in the signed stage record).")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def _seconds(text: str, option: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h or 30d", param_hint=option)
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _ids(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


@click.group()
def release() -> None:
    """Roll out bundles over MQTT: TUF-signed releases, canary first, automatic halt and rollback."""


@release.command("publish", epilog=examples(
    "fedge release publish fleet/ model-v2.fedge --canary-share 0.1",
    "fedge release publish fleet/ model-v2.fedge --canary eu-dev-0001,us-dev-0002 --expires 14d",
    "fedge release publish fleet/ model-v2.fedge --regions eu --no-canary --key-dir /media/offline-keys"))
@_FLEET
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--canary", "canary", default=None, help="Comma-separated canary devices (they install first).")
@click.option("--canary-share", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Share of the targeted devices drawn as canaries (at least one per region).")
@click.option("--no-canary", is_flag=True, help="Promote at once: every targeted device installs it.")
@click.option("--regions", default=None, help="Only these regions (comma-separated; default: every region).")
@click.option("--groups", default=None, help="Only devices in these groups (agent.toml [release] groups).")
@click.option("--devices", default=None, help="Only these devices (comma-separated).")
@click.option("--expires", default="30d", show_default=True, help="The release is not installed after this long.")
@click.option("--shared-start", type=click.Choice([s.value for s in SharedStart]), default="carry", show_default=True,
              help="carry: the new version starts from the fleet's current shared weights where names and shapes match; "
                   "bundle: from the bundle's own.")
@click.option("--max-accuracy-drop", type=click.IntRange(0, 100), default=20, show_default=True,
              help="Percentage points a canary's validation accuracy may fall below the previous version's.")
@click.option("--chunk-size", type=click.IntRange(min=1024), default=None, help="Bytes per MQTT chunk (default 64 KiB, capped to the broker limit).")
@_KEY_DIRS
def publish(fleet_dir: Path, bundle: Path, canary: str | None, canary_share: float | None, no_canary: bool,
            regions: str | None, groups: str | None, devices: str | None, expires: str, shared_start: str,
            max_accuracy_drop: int, chunk_size: int | None, key_dirs: tuple[Path, ...]) -> None:
    """Sign BUNDLE as the next release (targets role) and publish it to the root broker, canaries first.

    Without --canary, --canary-share or --no-canary, 10% of the targeted devices are the canaries.
    """
    from sdk.release.fleet_ops import open_release_fleet
    from sdk.release.plan import ReleaseChoices, plan_release
    from sdk.release.publisher import publish_repository

    expires_s = _seconds(expires, "--expires")
    if no_canary and (canary or canary_share is not None):
        raise InputError("--no-canary cannot be combined with --canary or --canary-share")
    if not no_canary and not canary and canary_share is None:
        canary_share = 0.1
    opened = open_release_fleet(fleet_dir)
    repo = opened.repository()
    number = max((e.info.release for e in repo.releases()), default=0) + 1
    choices = ReleaseChoices(targets=ReleaseTargets(regions=_ids(regions), groups=_ids(groups), devices=_ids(devices)),
                             canary=_ids(canary), canary_share=canary_share,
                             expires_ms=int((time.time() + expires_s) * 1000), chunk_size=chunk_size,
                             shared_start=SharedStart(shared_start), max_accuracy_drop_pct=max_accuracy_drop)
    info, data = plan_release(bundle, release=number, fleet=opened.name, fleet_key=opened.fleet_key(), choices=choices,
                              message_size_limit=opened.message_size_limit, devices=opened.devices())
    stage = Stage.CANARY if info.canary else Stage.PROMOTED
    record = StageRecord(release=number, stage=stage, reason="published" if info.canary else "published without canary",
                         decided_ms=int(time.time() * 1000))
    repo.add_release(info, data, opened.signers(key_dirs), stage=record)
    report = publish_repository(repo, opened.broker(f"fedge-release-{opened.name}"), opened.fleet.spec.topology.layout)
    click.echo(f"release {number}: {info.model_name} bundle v{info.bundle_version}, {info.length} bytes in {info.chunks} "
               f"chunk(s), targets {info.targets.describe()}, {stage.value}"
               + (f" on {', '.join(info.canary)}" if info.canary else ""))
    click.echo(f"published {report.metadata} metadata file(s) and {report.chunks} chunk(s) in {report.seconds:.1f} s")


def _set_stage(fleet_dir: Path, number: int, stage: Stage, reason: str, key_dirs: tuple[Path, ...]) -> None:
    from sdk.release.fleet_ops import open_release_fleet
    from sdk.release.publisher import publish_repository

    opened = open_release_fleet(fleet_dir)
    repo = opened.repository()
    entry = repo.release(number)
    if entry.stage is not None and entry.stage.stage is stage:
        click.echo(f"release {number} is already {stage.value}")
        return
    repo.set_stage(StageRecord(release=number, stage=stage, reason=reason, decided_ms=int(time.time() * 1000)),
                   opened.signers(key_dirs))
    publish_repository(repo, opened.broker(f"fedge-release-{opened.name}"), opened.fleet.spec.topology.layout)
    click.echo(f"release {number} ({entry.info.model_name} v{entry.info.bundle_version}): {stage.value} ({reason})")


@release.command("promote", epilog=examples("fedge release promote fleet/ 3"))
@_FLEET
@_RELEASE
@_REASON
@_KEY_DIRS
def promote(fleet_dir: Path, release: int, reason: str, key_dirs: tuple[Path, ...]) -> None:
    """Promote RELEASE to every targeted device now (without waiting for the canaries)."""
    _set_stage(fleet_dir, release, Stage.PROMOTED, reason, key_dirs)


@release.command("halt", epilog=examples("fedge release halt fleet/ 3 --reason 'accuracy drop in eu'"))
@_FLEET
@_RELEASE
@_REASON
@_KEY_DIRS
def halt(fleet_dir: Path, release: int, reason: str, key_dirs: tuple[Path, ...]) -> None:
    """Stop RELEASE: nobody installs it any more; devices running it return to the version they kept."""
    _set_stage(fleet_dir, release, Stage.HALTED, reason, key_dirs)


@release.command("rollback", epilog=examples("fedge release rollback fleet/ 3 --reason 'regression found'"))
@_FLEET
@_RELEASE
@_REASON
@_KEY_DIRS
def rollback(fleet_dir: Path, release: int, reason: str, key_dirs: tuple[Path, ...]) -> None:
    """Roll back a promoted RELEASE: devices and aggregators return to the previous version at a round boundary."""
    _set_stage(fleet_dir, release, Stage.ROLLED_BACK, reason, key_dirs)


@release.command("status", epilog=examples("fedge release status fleet/", "fedge release status fleet/ --json"))
@_FLEET
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to wait for the root broker.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the tables.")
def status(fleet_dir: Path, timeout: float, as_json: bool) -> None:
    """The releases (stage, canaries, health) and where every device stands, from its verified status."""
    from sdk.release.canary import judge_canaries
    from sdk.release.fleet_ops import open_release_fleet, verified_statuses

    opened = open_release_fleet(fleet_dir)
    repo = opened.repository()
    statuses = verified_statuses(opened.statuses(timeout_s=timeout))
    now_ms = int(time.time() * 1000)
    releases: list[dict[str, Any]] = []
    for entry in repo.releases():
        info = entry.info
        verdict = judge_canaries(info, statuses, staged_ms=entry.stage.decided_ms if entry.stage else now_ms, now_ms=now_ms)
        releases.append({"release": info.release, "bundle_version": info.bundle_version, "model": info.model_name,
                         "stage": entry.stage_name, "reason": entry.stage.reason if entry.stage else "",
                         "targets": info.targets.describe(), "expires_ms": info.expires_ms,
                         "canaries": [{"device": r.device, "state": r.state, "detail": r.detail} for r in verdict.canaries]})
    devices: list[dict[str, Any]] = []
    for device, region in sorted(opened.devices().items()):
        s = statuses.get(device)
        devices.append({"device": device, "region": region, "online": None if s is None else s.online,
                        "bundle_version": None if s is None else s.bundle_version,
                        "release": None if s is None else s.release.to_dict()})
    if as_json:
        click.echo(json.dumps({"fleet": opened.name, "releases": releases, "devices": devices}, indent=2))
        return
    click.echo(f"fleet {opened.name}: {len(releases)} release(s)")
    for r in releases:
        click.echo(f"  release {r['release']}: {r['model']} v{r['bundle_version']}, {r['stage']}"
                   + (f" ({r['reason']})" if r["reason"] else "") + f", targets {r['targets']}")
        for c in r["canaries"]:
            click.echo(f"    canary {c['device']}: {c['state']} {c['detail']}")
    click.echo("devices:")
    for d in devices:
        rel = d["release"]
        where = "no verified status" if rel is None else (
            f"{rel['state']}" + ("" if rel["version"] is None else f" release {rel['version']}")
            + (f": {rel['reason']}" if rel["reason"] else ""))
        version = "-" if d["bundle_version"] is None else f"v{d['bundle_version']}"
        click.echo(f"  {d['device']:<20} {d['region']:<8} {version:<5} {where}")


@release.command("controller", epilog=examples("fedge release controller fleet/",
                                               "fedge release controller fleet/ --once",
                                               "fedge release controller fleet/ --min-healthy 0.8 --canary-timeout 2h"))
@_FLEET
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between steps.")
@click.option("--once", is_flag=True, help="One step (promote/halt what is due, refresh expiring metadata), then exit.")
@click.option("--min-healthy", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Share of the canaries that must be healthy to promote.")
@click.option("--canary-timeout", default="30m", show_default=True, help="Halt a canary release not healthy by then.")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this long (default: run until SIGINT/SIGTERM).")
@_KEY_DIRS
def controller(fleet_dir: Path, interval: float, once: bool, min_healthy: float, canary_timeout: str,
               max_seconds: float | None, key_dirs: tuple[Path, ...]) -> None:
    """Promote canary releases whose canaries are healthy, halt the others; keep the online metadata fresh."""
    from sdk.cli.aggregator_cmd import _stop_on_signals
    from sdk.release.canary import CanaryPolicy
    from sdk.release.controller import ReleaseController
    from sdk.release.fleet_ops import open_release_fleet, verified_statuses
    from sdk.release.publisher import publish_repository

    timeout_s = _seconds(canary_timeout, "--canary-timeout")
    opened = open_release_fleet(fleet_dir)
    signers = opened.signers(key_dirs)
    for role in ("rollout", "snapshot", "timestamp"):
        if not signers.get(role):
            raise InputError(f"no {role} key in {', '.join(str(d) for d in (*key_dirs, opened.setup.key_dir))}: "
                             "the controller signs with the online roles")
    layout = opened.fleet.spec.topology.layout

    def publish(repo: ReleaseRepository) -> None:
        publish_repository(repo, opened.broker(f"fedge-release-controller-{opened.name}"), layout)

    ctl = ReleaseController(
        repository=opened.repository,
        statuses=lambda: verified_statuses(opened.statuses()),
        publish=publish,
        signers=signers,
        policy=CanaryPolicy(min_healthy=min_healthy, timeout_s=timeout_s),
    )
    if once:
        step = ctl.step()
        for number, verdict in sorted(step.verdicts.items()):
            click.echo(f"release {number}: {verdict.action.value} ({verdict.reason})")
        click.echo(f"re-signed: {', '.join(step.refreshed) or 'nothing due'}; published: {'yes' if step.published else 'no'}")
        return
    with _stop_on_signals() as stop:
        steps = ctl.run(stop, interval_s=interval, max_seconds=max_seconds)
    click.echo(f"stopped after {steps} step(s)")


@release.command("rotate", epilog=examples("fedge release rotate fleet/ targets --key-dir /media/offline-keys",
                                           "fedge release rotate fleet/ root --threshold 2"))
@_FLEET
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp", "rollout"]))
@click.option("--threshold", type=click.IntRange(min=1), default=None, help="The role's new threshold (default: as before).")
@_KEY_DIRS
def rotate(fleet_dir: Path, role: str, threshold: int | None, key_dirs: tuple[Path, ...]) -> None:
    """Replace ROLE's keys with fresh ones (a new root version; devices follow it over MQTT, no reflashing).

    The old keys are moved to FLEET/keys/release/retired/; the current root keys must sign (root threshold).
    """
    from sdk.release.fleet_ops import open_release_fleet
    from sdk.release.keys import add_role_key, key_file, load_public_keys, load_signers
    from sdk.release.publisher import publish_repository

    opened = open_release_fleet(fleet_dir)
    repo = opened.repository()
    key_dir = opened.setup.key_dir
    old = load_public_keys(key_dir, role)
    old_root = opened.signers(key_dirs)
    count = max(1, len(old))
    if threshold is not None:
        new_threshold = threshold
    elif role == "rollout":
        new_threshold = repo.targets.md.signed.delegations.roles["rollout"].threshold
    else:
        new_threshold = repo.root.md.signed.roles[role].threshold
    retired = key_dir / "retired"
    retired.mkdir(exist_ok=True)
    for index in old:
        for private in (True, False):
            path = key_file(key_dir, role, index, private=private)
            if path.exists():
                path.rename(retired / path.name)
    fresh = [add_role_key(key_dir, role)[1] for _ in range(count)]
    new_signers = load_signers([key_dir], role)
    signers = {**old_root, role: new_signers} if role != "root" else old_root
    version = repo.rotate(role, fresh, threshold=new_threshold, signers=signers,
                          new_root_signers=new_signers if role == "root" else ())
    publish_repository(repo, opened.broker(f"fedge-release-{opened.name}"), opened.fleet.spec.topology.layout)
    click.echo(f"{role}: {count} new key(s), threshold {new_threshold}; root is now v{version}; old keys in {retired}")
