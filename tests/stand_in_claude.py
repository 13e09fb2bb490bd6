#!/usr/bin/env python3
"""A stand-in for `claude --print --output-format stream-json --verbose`.

It speaks Claude Code's stream-json as the real CLI emits it (docs/claude-code.md): a system/init
line, one assistant line per content block, user lines with tool results, and a final
result line. It is the only thing in Patchwire's tests (and its demo) that stands in for
a real part: the AI. It reads the prompt on stdin.

What it does is scripted by the prompt: a line `#pw-script <JSON list>` holds steps, e.g.
    #pw-script [{"write": "a.txt", "text": "hi\\n"}, {"say": "done"}]
Steps: write (text or b64), delete, rename [a, b], chmod [path, "755"], say, sleep,
wait_file (until that path exists; at most max_s, default 60),
exit (code, no result line), error (is_error true, exit 1), deny (tool name; exit 0 with
permission_denials), hang (sleeps forever, with a child in its process group), spawn_ignoring_term,
usage (the result's `usage` object; with "cost": its total_cost_usd),
by_attempt {"1": [steps], "2": [steps]} (the steps of the attempt PATCHWIRE_ATTEMPT names).
raw (a line printed as is), raw_big (a line of N bytes), link [target, path] (a symlink),
stamps (N assistant text lines "stamp <time.time()>", each stamped as it is written, every_s
apart, default 0.003: the bench's AI line -> client latency),
copy [source, path] (reads a file, anywhere, into another), fill [path, MiB] (writes zeros),
read [paths] with out (a JSON object: each path's text, or the error reading it), env (a file
that gets the environment, one NAME=value a line), connect [socket paths] with out (each one's
"connected" or the error), run [argv] with out (its exit status and output; with "check":
true a failure ends the run with status 3),
random [path, MiB] (writes bytes that do not compress: a diff as large as the file),
lines [count, size] (prints that many plain lines of that many bytes: output without end),
fill_until_full path (writes zeros until the disk refuses, then goes on and ends well).
Paths are relative to the cwd, absolute, or start with ~ (the AI's HOME): a confinement test aims them outside.
Without a script it makes one small, visible edit: it adds a line to PATCHWIRE_DEMO.md.

STAND_IN_LOG (environment), when set, names a file that gets one JSON line per run with
argv, cwd and the environment keys it saw.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

SCRIPT_MARK = "#pw-script "


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def arg_value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


class StandIn:
    def __init__(self, argv, prompt):
        self.argv = argv
        self.prompt = prompt
        self.cwd = os.getcwd()
        self.session = arg_value(argv, "--resume") or str(uuid.uuid4())
        self.turns = 1
        self.denials = []
        self.usage = {"input_tokens": 120, "output_tokens": 45, "cache_read_input_tokens": 0}
        self.cost = 0.0123

    def assistant(self, block):
        emit({"type": "assistant", "message": {"id": "msg_" + uuid.uuid4().hex[:12], "type": "message",
              "role": "assistant", "model": "stand-in", "content": [block]},
              "parent_tool_use_id": None, "session_id": self.session})

    def tool(self, name, tool_input, ok=True, output="ok"):
        tool_id = "toolu_" + uuid.uuid4().hex[:20]
        self.assistant({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        emit({"type": "user", "message": {"role": "user", "content": [{"tool_use_id": tool_id,
              "type": "tool_result", "content": output, "is_error": not ok}]},
              "parent_tool_use_id": None, "session_id": self.session})
        self.turns += 1

    def path(self, rel):
        return os.path.join(self.cwd, os.path.expanduser(rel))

    def write_json(self, rel, obj):
        with open(self.path(rel), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    def result(self, text, is_error=False, subtype="success"):
        emit({"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": 12,
              "duration_api_ms": 10, "num_turns": self.turns, "result": text,
              "session_id": self.session, "total_cost_usd": self.cost, "usage": self.usage,
              "permission_denials": self.denials})

    def run(self):
        log = os.environ.get("STAND_IN_LOG")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"argv": self.argv, "cwd": self.cwd, "env": sorted(os.environ),
                                    "prompt": self.prompt}) + "\n")
        if "--verbose" not in self.argv and "stream-json" in self.argv:
            sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
            return 1
        emit({"type": "system", "subtype": "init", "cwd": self.cwd, "session_id": self.session,
              "tools": ["Bash", "Edit", "Read", "Write"], "model": "stand-in",
              "permissionMode": arg_value(self.argv, "--permission-mode") or "default",
              "apiKeySource": "none"})
        steps = self.steps()
        for step in steps:
            code = self.do(step)
            if code is not None:
                return code
        self.assistant({"type": "text", "text": "Done."})
        self.result("Done.")
        return 0

    def steps(self):
        for line in self.prompt.splitlines():
            if line.startswith(SCRIPT_MARK):
                return json.loads(line[len(SCRIPT_MARK):])
        return [{"say": "I'll note this request in PATCHWIRE_DEMO.md (stand-in AI, not Claude)."},
                {"append": "PATCHWIRE_DEMO.md", "text": "- %s\n" % " ".join(self.prompt.split())[:200]}]

    def do(self, step):
        if "by_attempt" in step:  # {"by_attempt": {"1": [steps], "2": [...]}}: PATCHWIRE_ATTEMPT's
            for inner in step["by_attempt"].get(os.environ.get("PATCHWIRE_ATTEMPT", "1"), []):
                code = self.do(inner)
                if code is not None:
                    return code
        elif "say" in step:
            self.assistant({"type": "text", "text": step["say"]})
        elif "write" in step:
            data = base64.b64decode(step["b64"]) if "b64" in step else step["text"].encode("utf-8")
            os.makedirs(os.path.dirname(self.path(step["write"])) or ".", exist_ok=True)
            with open(self.path(step["write"]), "wb") as f:
                f.write(data)
            self.tool("Write", {"file_path": self.path(step["write"]), "content": data.decode("utf-8", "replace")})
        elif "append" in step:
            with open(self.path(step["append"]), "a") as f:
                f.write(step["text"])
            self.tool("Edit", {"file_path": self.path(step["append"]), "old_string": "", "new_string": step["text"]})
        elif "delete" in step:
            os.unlink(self.path(step["delete"]))
            self.tool("Bash", {"command": "rm " + step["delete"], "description": "Delete a file"})
        elif "rename" in step:
            a, b = step["rename"]
            os.makedirs(os.path.dirname(self.path(b)) or ".", exist_ok=True)
            os.rename(self.path(a), self.path(b))
            self.tool("Bash", {"command": "mv %s %s" % (a, b), "description": "Rename"})
        elif "chmod" in step:
            path, mode = step["chmod"]
            os.chmod(self.path(path), int(mode, 8))
            self.tool("Bash", {"command": "chmod %s %s" % (mode, path), "description": "Mode"})
        elif "usage" in step:
            self.usage = step["usage"]
            self.cost = step.get("cost", self.cost)
        elif "raw" in step:
            sys.stdout.write(step["raw"] + "\n")
            sys.stdout.flush()
        elif "raw_big" in step:
            sys.stdout.write("x" * step["raw_big"] + "\n")
            sys.stdout.flush()
        elif "link" in step:
            target, path = step["link"]
            os.symlink(target, self.path(path))
            self.tool("Bash", {"command": "ln -s %s %s" % (target, path), "description": "Link"})
        elif "copy" in step:
            source, path = step["copy"]
            with open(self.path(source), "rb") as f:
                data = f.read()
            with open(self.path(path), "wb") as f:
                f.write(data)
            self.tool("Bash", {"command": "cp %s %s" % (source, path), "description": "Copy"})
        elif "fill" in step:
            path, mib = step["fill"]
            with open(self.path(path), "wb") as f:
                for _ in range(mib):
                    f.write(b"\0" * 1048576)
            self.tool("Write", {"file_path": self.path(path), "content": "(zeros)"})
        elif "read" in step:
            self.write_json(step["out"], {path: read_or_error(path) for path in step["read"]})
        elif "env" in step:
            with open(self.path(step["env"]), "w") as f:
                f.write("".join("%s=%s\n" % item for item in sorted(os.environ.items())))
        elif "connect" in step:
            self.write_json(step["out"], {path: connect(path) for path in step["connect"]})
        elif "run" in step:
            proc = subprocess.run(step["run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            with open(self.path(step["out"]), "wb") as f:
                f.write(b"rc=%d\n" % proc.returncode + proc.stdout)
            self.tool("Bash", {"command": " ".join(step["run"]), "description": "Run"})
            if step.get("check") and proc.returncode:
                sys.stderr.write("stand-in: %r failed: %s\n" % (step["run"], proc.stdout.decode()[-300:]))
                return 3
        elif "random" in step:
            path, mib = step["random"]
            with open(self.path(path), "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1048576))
            self.tool("Write", {"file_path": self.path(path), "content": "(random bytes)"})
        elif "lines" in step:
            count, size = step["lines"]
            line = "y" * size + "\n"
            for _ in range(count):
                sys.stdout.write(line)
            sys.stdout.flush()
        elif "fill_until_full" in step:
            try:
                with open(self.path(step["fill_until_full"]), "wb") as f:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            except OSError:
                pass  # the disk is full: an AI that writes on regardless of errors
            self.tool("Write", {"file_path": self.path(step["fill_until_full"]), "content": "(zeros)"})
        elif "stamps" in step:
            for _ in range(step["stamps"]):
                time.sleep(step.get("every_s", 0.003))
                self.assistant({"type": "text", "text": "stamp %r" % time.time()})
        elif "sleep" in step:
            time.sleep(step["sleep"])
        elif "wait_file" in step:  # a gate the test opens: jobs that wait without timed sleeps
            deadline = time.monotonic() + step.get("max_s", 60)
            while not os.path.exists(step["wait_file"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        elif "exit" in step:
            sys.stderr.write("stand-in: exiting with %d as scripted\n" % step["exit"])
            return step["exit"]
        elif "error" in step:
            self.result("API Error: " + step["error"], is_error=True)
            return 1
        elif "deny" in step:
            self.denials.append({"tool_name": step["deny"], "tool_use_id": "toolu_x",
                                 "tool_input": {"file_path": self.path("x")}})
            self.tool(step["deny"], {"file_path": self.path("x")}, ok=False,
                      output="Claude requested permissions to write to x, but you haven't granted it yet.")
        elif "hang" in step:
            # a child in the same process group: a cancel must end it too
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            if step.get("pidfile"):
                with open(step["pidfile"], "w") as f:
                    f.write("%d %d\n" % (os.getpid(), child.pid))
            self.assistant({"type": "text", "text": "Thinking for a long time..."})
            if step.get("ignore_term"):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        else:
            raise SystemExit("stand-in: unknown step %r" % (step,))
        return None


def read_or_error(path):
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return "error: %s" % e.strerror


def connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        sock.connect(path)
        sock.sendall(b"hello from the AI\n")
        return "connected"
    except OSError as e:
        return "error: %s" % e.strerror
    finally:
        sock.close()


def main():
    prompt = sys.stdin.read()
    return StandIn(sys.argv[1:], prompt).run()


if __name__ == "__main__":
    sys.exit(main())
