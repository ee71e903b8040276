"""``require_shared``: a missing ``../shared`` input skips a test on a developer machine and fails it under CI."""

from __future__ import annotations

import re

import pytest

from tests.conftest import require_shared


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_directory_fails_under_ci(tmp_path, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    missing = tmp_path / "golden"
    with pytest.raises(pytest.fail.Exception, match=re.escape(str(missing))):
        require_shared(missing, "golden fixtures")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_directory_skips_outside_ci(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    missing = tmp_path / "golden"
    with pytest.raises(pytest.skip.Exception, match=re.escape(str(missing))):
        require_shared(missing, "golden fixtures")


def test_empty_directory_counts_as_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="golden fixtures not found"):
        require_shared(tmp_path, "golden fixtures")


def test_present_directory_is_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    (tmp_path / "common.pt").write_bytes(b"")
    assert require_shared(tmp_path, "golden fixtures") == tmp_path
