"""Headless Chromium for the tests of the web pages: Debian's chromium and chromedriver, no driver download."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def browser(profile: Path, *flags: str):  # type: ignore[no-untyped-def]
    """Headless Chromium through chromedriver; a missing browser is a failure, not a skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the gallery test needs headless Chromium: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the gallery test needs selenium: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900", *flags,
    ):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(chromedriver))
