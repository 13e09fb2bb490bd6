"""What a prompt-injected AI leaves behind in its job folder, its AI home or the machine, against
the jobs after it (its own user's and other users'). The real agent under bubblewrap, as root
and as an ordinary account (test_box_walls' WallsBox), the stand-in AI running real programs.

- a FIFO where the agent writes the job folder's `.git` file must not hang the next job (it
  ran under the project's lock, so every later ask of the project, and a restart's recovery,
  hung with it);
- a file where the AI home's `.claude` folder goes must not fail every later job of the user;
- SysV message queues and shared memory die with the job (its own IPC namespace): no channel
  to a later job of another user that no network rule sees;
- the agent's own TMPDIR, where other jobs' gateway sockets live, is hidden from the AI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import secrets

from conftest import script
from test_box_walls import EMPTY_TREE, WallsBox, place, walls_box  # noqa: F401 - fixtures

PYTHON = "/usr/bin/python3"
LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IPC_RMID = 0

MAKE_IPC = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
key = int(sys.argv[1])
q = libc.msgget(key, 0o1000 | 0o600)
buf = ctypes.create_string_buffer(8 + 5)
ctypes.memmove(ctypes.addressof(buf), ctypes.byref(ctypes.c_long(1)), 8)
ctypes.memmove(ctypes.addressof(buf) + 8, b"leak!", 5)
sent = libc.msgsnd(q, buf, 5, 0)
shm = libc.shmget(key + 1, 4096, 0o1000 | 0o600)
print(q, sent, shm)
"""


def ask(box: WallsBox, *steps: dict, user: str = "alice", timeout: float = 60) -> dict:
    body = {"project": "p", "tree": EMPTY_TREE, "files": [], "prompt": script(*steps)}
    status, job = box.agent.json("POST", "/v1/ask", body, token=box.agent.tokens[user])
    assert status == 202, job
    return box.agent.wait_job(job["id"], timeout=timeout)


def test_a_fifo_left_as_the_job_folders_git_file_does_not_hang_the_next_job(walls_box):  # noqa: F811
    box = walls_box()
    first = ask(box, {"run": [PYTHON, "-c", "import os; os.unlink('.git'); os.mkfifo('.git')"], "out": "o.txt"})
    assert first["status"] == "done", first
    second = ask(box, {"write": "a.txt", "text": "a\n"}, timeout=30)  # hung for ever before
    assert second["status"] == "done", second.get("reason")
    assert b"+++ b/a.txt" in box.diff(second) and b".git" not in box.diff(second).split(b"+++ b/a.txt")[0]
    assert (box.state / "users/alice").exists()


def test_a_file_left_where_the_ai_homes_claude_folder_goes_fails_no_later_job(walls_box):  # noqa: F811
    box = walls_box()
    (box.home / ".claude/.credentials.json").unlink()  # no login bound there (as when the gateway holds it)
    first = ask(box, {"run": ["sh", "-c", "rm -rf \"$HOME/.claude\"; echo x > \"$HOME/.claude\""], "out": "o.txt"})
    assert first["status"] == "done", first
    for _ in range(2):
        later = ask(box, {"write": "b.txt", "text": "b\n"})
        assert later["status"] == "done", later  # "internal error in the agent: File exists" before


def test_sysv_ipc_made_in_a_job_is_gone_with_it(walls_box):  # noqa: F811
    box = walls_box()
    key = 0x50570000 + secrets.randbelow(0xFFFF)
    try:
        job = ask(box, {"run": [PYTHON, "-c", MAKE_IPC, str(key)], "out": "ipc.txt"})
        assert job["status"] == "done", job
        rc, made = box.added(job, "ipc.txt").split("\n", 1)
        queue, sent, shm = (int(x) for x in made.split())
        assert rc == "rc=0" and queue >= 0 and sent == 0 and shm >= 0, made  # made, inside the job
        # ... and none of it is there for anyone after the job (the host's namespace)
        assert LIBC.msgget(key, 0) == -1 and LIBC.shmget(key + 1, 0, 0) == -1
    finally:  # the code before the fix left them: remove them so the box stays clean
        for made, remove in ((LIBC.msgget(key, 0), LIBC.msgctl), (LIBC.shmget(key + 1, 0, 0), LIBC.shmctl)):
            if made >= 0:
                remove(made, IPC_RMID, None)


def test_the_agents_tmpdir_with_the_gateway_sockets_is_hidden_from_the_ai(walls_box, place):  # noqa: F811
    tmpdir = place / "agent-tmp"  # outside /tmp (always hidden): a box whose TMPDIR is /data/tmp
    tmpdir.mkdir(mode=0o755)
    box = walls_box(env={"TMPDIR": str(tmpdir)}, network={"mode": "allowlist", "presets": [], "allow": []})
    look = f"import json, os, sys; print(json.dumps(sorted(os.listdir({str(tmpdir)!r}))))"
    job = ask(box, {"run": [PYTHON, "-c", look], "out": "seen.txt"})
    assert job["status"] == "done", job
    assert box.added(job, "seen.txt") == "rc=0\n[]"  # its own gateway's pw-gateway-* folder before


def test_a_folder_the_ai_made_unreadable_hides_nothing_and_keeps_nothing(walls_box):  # noqa: F811
    """`git add -A` only warns of a folder it cannot read and goes on: run as an ordinary
    account, the agent left what the AI hid in it out of the diff, and its reset kept it for
    the next job. Now the job fails saying so and the folder is made anew; as root git reads
    it, and the file is in the diff."""
    box = walls_box()
    hide = "import os; os.makedirs('src'); open('src/planted.py', 'w').write('PLANTED = 1\\n'); os.chmod('src', 0o300)"
    first = ask(box, {"run": [PYTHON, "-c", hide], "out": "o.txt"})
    if box.who == "account":
        assert first["status"] == "failed" and "a folder the agent cannot read (src" in first["reason"], first
    else:
        assert first["status"] == "done" and b"+++ b/src/planted.py" in box.diff(first), first
    look = "import os; print(os.path.exists('src/planted.py'))"
    second = ask(box, {"run": [PYTHON, "-c", look], "out": "seen.txt"})
    assert second["status"] == "done", second.get("reason")
    assert box.added(second, "seen.txt") == "rc=0\nFalse"


def test_a_fifo_left_as_a_gitignore_stalls_git_only_until_it_is_removed(walls_box):  # noqa: F811
    """git opens each .gitignore it passes, and a FIFO blocks it until a writer comes: collect's
    `add -A` hung for 600 s, then the reset as long. A job folder's git that stalls past
    GIT_STALL_S (here 2 s) has the folder's FIFOs removed and runs again."""
    box = walls_box(env={"PATCHWIRE_GIT_STALL_S": "2"})
    plant = "import os; os.makedirs('sub'); os.mkfifo('sub/.gitignore'); open('sub/a.txt', 'w').write('a\\n')"
    first = ask(box, {"run": [PYTHON, "-c", plant], "out": "o.txt"}, timeout=60)
    assert first["status"] == "done", first.get("reason")
    diff = box.diff(first)
    assert b"+++ b/sub/a.txt" in diff and b".gitignore" not in diff
    second = ask(box, {"write": "b.txt", "text": "b\n"}, timeout=30)
    assert second["status"] == "done", second.get("reason")
