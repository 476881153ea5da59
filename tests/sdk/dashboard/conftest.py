"""Fixtures of the dashboard tests."""

from tests.sdk.dashboard.browser import browser  # noqa: F401 - a fixture
