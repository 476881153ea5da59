"""The anti-rollback rule, pure: every answer and every refusal."""

from __future__ import annotations

import pytest

from device_agent.bundle.install_policy import (
    BundleDowngradeError,
    InstallDecision,
    InstalledRecord,
    check_install,
    read_record,
    versions_dir,
    write_record,
)
from device_agent.errors import BundleError


def record(version: int, sha: str = "a" * 64, name: str = "m") -> InstalledRecord:
    return InstalledRecord(model_name=name, bundle_version=version, manifest_sha256=sha)


def test_check_install_allows_first_and_newer_versions():
    assert check_install(None, record(1)) is InstallDecision.INSTALL
    assert check_install(record(1), record(2, "b" * 64)) is InstallDecision.INSTALL
    assert check_install(record(1, name="m"), record(5, name="other")) is InstallDecision.INSTALL


def test_check_install_same_bundle_again_is_already_installed():
    assert check_install(record(3), record(3)) is InstallDecision.ALREADY_INSTALLED


def test_check_install_refuses_older_version_naming_both():
    with pytest.raises(BundleDowngradeError, match=r"m v2: this device already installed v3") as caught:
        check_install(record(3), record(2, "b" * 64))
    assert (caught.value.installed.bundle_version, caught.value.offered.bundle_version) == (3, 2)
    with pytest.raises(BundleDowngradeError, match="never go back"):  # another model's old bundle is a rollback too
        check_install(record(3, name="m"), record(1, name="other"))


def test_check_install_refuses_same_version_with_other_content():
    with pytest.raises(BundleDowngradeError, match="different bundle v3.*needs a higher version"):
        check_install(record(3, "a" * 64), record(3, "b" * 64))


def test_record_round_trips_next_to_the_install_dir(tmp_path):
    dest = tmp_path / "bundle"
    assert read_record(dest) is None
    write_record(dest, record(4))
    assert read_record(dest) == record(4)
    assert (versions_dir(dest) / "highest.json").is_file() and versions_dir(dest).parent == tmp_path


@pytest.mark.parametrize("content", [b"{not json", b'{"model_name": "m"}', b'{"model_name": 1, "bundle_version": "3", '
                                     b'"manifest_sha256": "x"}', b"[]"])
def test_damaged_record_is_an_error_naming_the_file_not_a_reset(tmp_path, content):
    dest = tmp_path / "bundle"
    versions_dir(dest).mkdir()
    (versions_dir(dest) / "highest.json").write_bytes(content)
    with pytest.raises(BundleError, match="highest.json"):
        read_record(dest)


# -- the one way back (docs/rollout.md, "The local rollback rule") ---------------------------------


def test_check_offer_refuses_an_older_version_before_any_download():
    from device_agent.bundle.install_policy import check_offer

    check_offer(None, model_name="m", bundle_version=1)
    check_offer(record(2), model_name="m", bundle_version=2)  # same version: the manifest decides after the download
    check_offer(record(2), model_name="m", bundle_version=3)
    with pytest.raises(BundleDowngradeError, match="m v1: this device already installed v2"):
        check_offer(record(2), model_name="m", bundle_version=1)


def test_check_install_refuses_a_bundle_marked_failed_even_at_the_top():
    from device_agent.bundle.install_policy import BundleFailedError

    failed = (record(3, "f" * 64),)
    with pytest.raises(BundleFailedError, match="marked it failed"):
        check_install(record(3, "f" * 64), record(3, "f" * 64), failed=failed)
    assert check_install(record(3, "f" * 64), record(4, "c" * 64), failed=failed) is InstallDecision.INSTALL


def test_check_revert_needs_a_failure_or_a_signed_withdrawal():
    from device_agent.bundle.install_policy import check_revert

    running, previous = record(3, "c" * 64), record(2, "b" * 64)
    check_revert(record(3, "c" * 64), running=running, previous=previous, marked_failed=True, withdrawn=False)
    check_revert(record(3, "c" * 64), running=running, previous=previous, marked_failed=False, withdrawn=True)
    with pytest.raises(BundleDowngradeError):
        check_revert(record(3, "c" * 64), running=running, previous=previous, marked_failed=False, withdrawn=False)


def test_check_revert_is_one_step_from_the_top_only():
    from device_agent.bundle.install_policy import check_revert

    # Running v2 after having installed v3 (already went back once): no second step down.
    with pytest.raises(BundleDowngradeError):
        check_revert(record(3), running=record(2, "b" * 64), previous=record(1, "c" * 64), marked_failed=True,
                     withdrawn=True)
    with pytest.raises(ValueError, match="not older"):
        check_revert(None, running=record(2), previous=record(2, "b" * 64), marked_failed=True, withdrawn=False)


def test_failed_record_round_trips_and_refuses_damage(tmp_path):
    from device_agent.bundle.install_policy import FAILED_NAME, add_failed, read_failed

    dest = tmp_path / "bundle"
    assert read_failed(dest) == ()
    add_failed(dest, record(3, "c" * 64))
    add_failed(dest, record(3, "c" * 64))
    add_failed(dest, record(4, "d" * 64))
    assert read_failed(dest) == (record(3, "c" * 64), record(4, "d" * 64))
    (versions_dir(dest) / FAILED_NAME).write_text("{broken")
    with pytest.raises(BundleError, match="damaged record of failed bundles"):
        read_failed(dest)
