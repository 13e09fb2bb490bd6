"""Find the real Claude Code CLI installed for tests, and the environment that keeps it offline.

``tests/install_claude_cli.sh`` installs a pinned ``@anthropic-ai/claude-code`` (2.1.197, the
last release that accepts Node 20) into ``tests/.claude-cli/``. Tests run it against
``tests/messages_api.FakeMessagesAPI`` on loopback::

    cli = find_claude_cli()                     # None when not installed: skip
    env = claude_env(tmp_path / "home", api.base_url)
    subprocess.run([cli, "--print", "--output-format", "stream-json", "--verbose", ...],
                   input=prompt, env=env, cwd=workdir, ...)

What keeps it offline (2.1.197, checked with ``strace -f -e trace=connect,sendto,sendmmsg``):

- The environment is built from nothing, never copied from ``os.environ``: an inherited
  ``ANTHROPIC_AUTH_TOKEN``, ``CLAUDE_CODE_USE_BEDROCK``/``_VERTEX``, ``HTTPS_PROXY``,
  ``CLAUDE_CONFIG_DIR`` or a real ``HOME`` with ``~/.claude`` settings could send a test's
  traffic, or a real key, elsewhere.
- ``ANTHROPIC_BASE_URL`` sends every API call to the stand-in: a ``HEAD /`` warm-up, then
  ``POST /v1/messages?beta=true``. Any ``ANTHROPIC_API_KEY`` is accepted; it goes to the stand-in.
- ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` is the one that matters beyond that: without it
  the CLI resolves api.anthropic.com (event logging) on every run, several times, and also asks
  the model for a session title (an extra, tool-less request). ``DISABLE_TELEMETRY=1`` alone
  still leaves one lookup of api.anthropic.com. With it, strace saw DNS for nothing and no
  connect() to anything but 127.0.0.1. The other ``DISABLE_*`` variables are set too, as cheap
  insurance against versions that split these switches differently.
- ``CLAUDE_CODE_MAX_RETRIES`` bounds retries of failed API calls (the default retries about ten
  times with growing waits: a 500 took minutes to fail). 0 means one attempt.
- ``HOME`` is a fresh directory per test: the CLI writes ``~/.claude.json`` and
  ``~/.claude/projects/<encoded cwd>/<session>.jsonl`` there (which ``--resume`` reads back).
- ``IS_SANDBOX=1`` is not set by default: ``--permission-mode acceptEdits`` does not need it. Only
  ``--dangerously-skip-permissions`` / ``bypassPermissions`` as root refuse to start without it;
  pass ``IS_SANDBOX="1"`` in ``extra`` for those.

Permissions under ``--permission-mode acceptEdits`` (2.1.197): Write, Edit and Read in the cwd, and
Bash file commands there such as ``rm file``, run without prompts. Other Bash commands (for
example ``python3 -c ...``) are denied: the tool_result says "This command requires approval",
the result line lists them in ``permission_denials``, and the exit code is still 0.
``--allowedTools Bash`` lets every Bash command run.
"""

import os
import shutil
from pathlib import Path
from typing import Dict, Optional

TESTS_DIR = Path(__file__).resolve().parent
CLI_PATH = TESTS_DIR / ".claude-cli" / "node_modules" / ".bin" / "claude"
INSTALL_SCRIPT = TESTS_DIR / "install_claude_cli.sh"
DUMMY_API_KEY = "sk-ant-test-dummy-key"


def find_claude_cli() -> Optional[str]:
    """The installed test copy of the CLI, or None when install_claude_cli.sh has not run."""
    if CLI_PATH.is_file() and os.access(CLI_PATH, os.X_OK):
        return str(CLI_PATH)
    return None


def _search_path() -> str:
    """A PATH with the system tools the CLI's Bash tool needs (sh, rm, git) and node."""
    dirs = ["/usr/local/bin", "/usr/bin", "/bin"]
    node = shutil.which("node")
    if node:
        dirs.insert(0, str(Path(node).parent))
    return os.pathsep.join(dict.fromkeys(dirs))


def claude_env(home: Path, base_url: str, **extra: str) -> Dict[str, str]:
    """The whole environment for running the real CLI offline against ``base_url``.

    ``home`` is created when missing. ``extra`` adds or overrides variables (for example
    ``CLAUDE_CODE_MAX_RETRIES="2"`` or ``IS_SANDBOX="1"``).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": _search_path(),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": DUMMY_API_KEY,
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


def require_claude_cli() -> str:
    """The installed CLI's path; skips the test when it is missing (fails it when CI=true)."""
    import pytest
    path = find_claude_cli()
    if path is None:
        message = "Claude Code CLI not installed: run tests/install_claude_cli.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
