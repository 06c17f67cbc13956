"""The official JavaScript Inngest SDK for the relay's tests, installed by npm
into .cache/ (gitignored), once per version spec: a fresh clone pays for one
install (half a minute), which starts in the background as soon as the
session has collected a test that needs it, so the tests before it overlap it.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent.parent
# The JavaScript SDK's major version under test; npm installs its newest release.
SPEC = "inngest@4"
CACHE = PROJECT / ".cache" / "npm" / SPEC.replace("@", "-")
NODE_MODULES = CACHE / "node_modules"


def installed() -> bool:
    return (NODE_MODULES / "inngest" / "package.json").exists()


class Install:
    """``npm install`` of SPEC into CACHE on a thread; ``wait()`` for its outcome."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="npm install", daemon=True)

    def start(self) -> Install:
        self._thread.start()
        return self

    def wait(self, timeout: float = 600) -> str | None:
        """None once the SDK is in NODE_MODULES, else what went wrong."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return f"npm install {SPEC} took over {timeout:g} s"
        return self.problem

    def stop(self) -> None:
        """The session ends: npm must not go on writing after it."""
        with self._lock:
            self._stopped = True
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            self.problem = self._install()
        except Exception as exc:  # told by wait(), on the test's thread
            self.problem = f"npm install {SPEC}: {type(exc).__name__}: {exc}"

    def _install(self) -> str | None:
        if shutil.which("node") is None or shutil.which("npm") is None:
            return "node and npm are not installed"
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        with (CACHE.parent / f"{CACHE.name}.lock").open("w") as lock:
            # Another session (another worktree's run of the same checkout, or
            # a pytest-xdist worker) may be installing: one installs, the others wait.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if installed():
                return None
            # Into a directory of its own, renamed when whole: an interrupted
            # install leaves no half a cache that looks complete.
            staging = Path(tempfile.mkdtemp(prefix=f"{CACHE.name}.", dir=CACHE.parent))
            staging.chmod(0o755)  # mkdtemp makes it private
            try:
                with self._lock:
                    if self._stopped:
                        return "the session ended"
                    self._process = subprocess.Popen(
                        ["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                         SPEC],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    )  # fmt: skip
                _, stderr = self._process.communicate(timeout=600)
                if self._process.returncode != 0:
                    return f"npm install {SPEC} failed:\n{stderr[-2000:]}"
                if not (staging / "node_modules" / "inngest" / "package.json").exists():
                    return f"npm install {SPEC} installed no inngest package:\n{stderr[-2000:]}"
                shutil.rmtree(CACHE, ignore_errors=True)  # an unfinished one of an older layout
                staging.rename(CACHE)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return None


INSTALL = pytest.StashKey[Install]()


def start_if_needed(session: pytest.Session) -> None:
    """Start the install when a collected test needs the SDK and it is not cached."""
    if installed():
        return
    if any("inngest_js" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[INSTALL] = Install().start()


def stop(session: pytest.Session) -> None:
    install = session.config.stash.get(INSTALL, None)
    if install is not None:
        install.stop()
