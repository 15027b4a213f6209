"""Headless Chromium: see a report as a browser renders it, not only as the text we wrote.

A screenshot shows whether the plots are legible; the DOM as Chromium parsed it
shows whether the page is well formed (an unclosed tag or a stray `<` moves or
swallows elements, which a string search in the HTML would not notice).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Offline and stateless: no first-run setup, no background fetches, a fresh profile per call.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not produce what was asked."""


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _run_chromium(args: list[str], *, timeout: float) -> str:
    """Run Chromium with a throwaway profile; its stdout. The whole process group goes on a timeout."""
    executable = find_chromium()
    if executable is None:
        raise BrowserError(f"Chromium not found on PATH (looked for {', '.join(CHROMIUM_NAMES)}); "
                           "install it, e.g. `apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="factory-chromium-") as profile:
        process = subprocess.Popen([executable, *_FLAGS, f"--user-data-dir={profile}", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its renderer and GPU helpers too
            process.communicate()
            raise BrowserError(f"Chromium did not finish within {timeout:g} s: {' '.join(args)}") from None
    if process.returncode != 0:
        raise BrowserError(f"Chromium exited with {process.returncode}: {' '.join(args)}\n{stderr[-2000:]}")
    return stdout


def _page_url(html_path: str | Path) -> str:
    path = Path(html_path).resolve()
    if not path.is_file():
        raise BrowserError(f"{html_path}: no such file")
    return path.as_uri()


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 2400,
               *, timeout: float = 120) -> Path:
    """A PNG of the page's top `width` × `height` CSS pixels, written atomically."""
    url, png_path = _page_url(html_path), Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (so the rename is atomic) and named *.png: Chromium picks the format from the suffix.
    with tempfile.TemporaryDirectory(prefix=".screenshot-", dir=png_path.parent) as folder:
        shot = Path(folder).resolve() / "page.png"
        _run_chromium([f"--screenshot={shot}", f"--window-size={width},{height}", url], timeout=timeout)
        if not shot.exists() or shot.stat().st_size == 0:  # Chromium exits 0 on some failures
            raise BrowserError(f"Chromium exited normally but wrote no screenshot of {html_path}")
        os.replace(shot, png_path)
    return png_path


def dump_dom(html_path: str | Path, *, timeout: float = 120) -> str:
    """The page's DOM serialised after Chromium parsed and loaded it."""
    return _run_chromium(["--dump-dom", _page_url(html_path)], timeout=timeout)
