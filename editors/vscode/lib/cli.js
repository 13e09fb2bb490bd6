'use strict';
// The `patchwire` program, driven only through its --json interface: the extension has no
// second implementation of the protocol and no second place that applies a patch. Each method
// of `Cli` is one CLI command. No `vscode` here, so the unit tests load it as it is.
//
// What the CLI prints with --json: one JSON document on stdout (JSON lines for `ask`: the
// agent's events, then {"type": "outcome"}); on an expected failure a last line
// {"error", "hint", "exit_status", "details"} and a non-zero exit. Human progress ("synced 3
// files") goes to stderr.

const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const END_EVENTS = new Set(['finished', 'failed', 'cancelled']);

class CliError extends Error {
  /** An expected failure, worded by the CLI itself (`message` and `hint` are its own). */
  constructor(message, { hint = '', exitStatus = 1, code = '', notFound = false } = {}) {
    super(message);
    this.hint = hint;
    this.exitStatus = exitStatus;
    this.code = code;
    this.notFound = notFound;
  }
}

/** The program to run: the setting (with ~ expanded), else `patchwire` on PATH, else
 * ~/bin/patchwire; null when none of them is an executable file. */
function findProgram(setting, env = process.env, home = os.homedir()) {
  const expand = (p) => (p === '~' || p.startsWith('~/') ? path.join(home, p.slice(1)) : p);
  if (setting && setting.trim()) {
    const given = expand(setting.trim());
    return isExecutable(given) ? given : null;
  }
  for (const dir of (env.PATH || '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, 'patchwire'))) {
      return path.join(dir, 'patchwire');
    }
  }
  const inHome = path.join(home, 'bin', 'patchwire');
  return isExecutable(inHome) ? inHome : null;
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch (e) {
    return false;
  }
}

/** The project folder: the one holding the .patchwire.toml that applies, in or above the
 * first candidate (the active file's workspace folder first) that has one. The CLI looks
 * upward the same way; the project's paths are relative to this folder (a monorepo's package
 * opened on its own: the project is its repository's top, not the folder open). */
function projectFolder(candidates) {
  for (const folder of candidates) {
    for (let dir = folder; ; dir = path.dirname(dir)) {
      if (fs.existsSync(path.join(dir, '.patchwire.toml'))) {
        return dir;
      }
      if (path.dirname(dir) === dir) {
        break;
      }
    }
  }
  return null;
}

// A line longer than this is not kept (a box's AI may say hundreds of MB in one job, which
// `show --json` writes as one line): it becomes TOO_LONG, and its bytes are dropped as they come.
const MAX_LINE_CHARS = 32 * 1024 * 1024;
const TOO_LONG = { type: 'too_long' };
const MAX_KEPT = 100;
const MAX_STDERR = 64 * 1024;

/** Splits a byte stream into lines; a line may arrive in several chunks. Each chunk is read
 * once (the pieces of an unfinished line are joined when its end comes, not at each chunk). */
class LineSplitter {
  constructor(maxChars = MAX_LINE_CHARS) {
    this.pieces = [];
    this.size = 0;
    this.maxChars = maxChars;
    this.decoder = new (require('string_decoder').StringDecoder)('utf8');
  }

  push(chunk) {
    return this.split(this.decoder.write(chunk));
  }

  split(text) {
    const parts = text.split('\n');
    const lines = [];
    for (let i = 0; i < parts.length; i++) {
      if (this.size <= this.maxChars) {
        this.pieces.push(parts[i]);
      }
      this.size += parts[i].length;
      if (i < parts.length - 1) {
        lines.push(this.take());
      }
    }
    return lines.filter((l) => l === TOO_LONG || l.trim());
  }

  take() {
    const line = this.size > this.maxChars ? TOO_LONG : this.pieces.join('');
    this.pieces = [];
    this.size = 0;
    return line;
  }

  end() {
    const lines = this.split(this.decoder.end());
    const last = this.take();
    return lines.concat(last === TOO_LONG || last.trim() ? [last] : []);
  }
}

/** One stdout line as an object; a line that is not a JSON object is kept as text. */
function parseLine(line) {
  if (line === TOO_LONG) {
    return { type: 'unparsed', text: `(a line of more than ${MAX_LINE_CHARS / 1024 / 1024} MB, not read)`, tooLong: true };
  }
  try {
    const value = JSON.parse(line);
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      return value;
    }
  } catch (e) {
    // not JSON: fall through
  }
  return { type: 'unparsed', text: line };
}

/** The CLI's own error for a failed run: its JSON error line, else the tail of stderr. */
function errorFrom(run) {
  const reported = run.objects.filter((o) => typeof o.error === 'string' && !o.type).pop();
  if (reported) {
    return new CliError(reported.error, {
      hint: reported.hint || '', exitStatus: reported.exit_status || run.code,
      code: (reported.details && reported.details.code) || '',
    });
  }
  const tail = run.stderr.trim().split('\n').slice(-3).join('\n');
  const how = run.signal ? `was stopped (${run.signal})` : `exited with status ${run.code}`;
  return new CliError(`patchwire ${how}` + (tail ? `: ${tail}` : ''), { exitStatus: run.code || 1 });
}

class Cli {
  /** `program` from findProgram; `cwd` the project folder; `log(line)` gets stderr lines. */
  constructor({ program, cwd, env = process.env, log = () => {} }) {
    this.program = program;
    this.cwd = cwd;
    this.env = env;
    this.log = log;
  }

  /** Start `patchwire ARGS --json`. Returns {done, interrupt}: `done` resolves to
   * {code, signal, objects, stderr}; `onObject` sees each stdout object as it arrives. */
  start(args, { input = null, onObject = () => {} } = {}) {
    if (!this.program) {
      const err = new CliError('the patchwire program was not found', {
        hint: 'set patchwire.path in the settings, or put patchwire on PATH or in ~/bin',
        notFound: true,
      });
      return { done: Promise.reject(err), interrupt() {} };
    }
    // With a `--`, what follows it are file names, whatever they look like, and --json goes
    // right after the command (argparse wants the positionals, JOB -- NAME..., together).
    const argv = args.includes('--') ? [args[0], '--json', ...args.slice(1)] : [...args, '--json'];
    const child = childProcess.spawn(this.program, argv, {
      cwd: this.cwd, env: this.env, stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out = new LineSplitter();
    const err = new LineSplitter();
    // Kept for the end: the results and errors (objects with no type, or an outcome), the
    // last MAX_KEPT of them, whether a line was too long, and stderr's last MAX_STDERR chars.
    // The events go to onObject only: an ask's stream may be endless.
    const run = { code: null, signal: null, objects: [], stderr: '', tooLong: false };
    const take = (line) => {
      const obj = parseLine(line);
      if (!obj.type || obj.type === 'outcome') {
        run.objects.push(obj);
        run.objects.splice(0, run.objects.length - MAX_KEPT);
      }
      run.tooLong = run.tooLong || Boolean(obj.tooLong);
      onObject(obj);
    };
    const note = (line) => {
      run.stderr = (run.stderr + (line === TOO_LONG ? '(a line too long to keep)' : line) + '\n').slice(-MAX_STDERR);
      this.log(line === TOO_LONG ? '(a line too long to show)' : line);
    };
    child.stdout.on('data', (c) => out.push(c).forEach(take));
    child.stderr.on('data', (c) => err.push(c).forEach(note));
    child.stdin.on('error', () => {}); // the CLI may exit before reading: nothing to do
    child.stdin.end(input === null ? '' : input);
    const done = new Promise((resolve, reject) => {
      child.on('error', (e) => reject(e.code === 'ENOENT' || e.code === 'EACCES'
        ? new CliError(`cannot run ${this.program}: ${e.code}`, {
          hint: 'check patchwire.path in the settings', notFound: true,
        })
        : e));
      child.on('close', (code, signal) => {
        out.end().forEach(take);
        err.end().forEach(note);
        Object.assign(run, { code, signal });
        resolve(run);
      });
    });
    // SIGINT is the CLI's Ctrl-C: it stops before the job exists, and says so.
    return { done, interrupt: () => child.kill('SIGINT') };
  }

  /** Run to the end; the last stdout object, or the CLI's error. */
  async json(args, input = null) {
    const run = await this.start(args, { input }).done;
    if (run.code !== 0) {
      throw errorFrom(run);
    }
    const last = run.objects.filter((o) => o.type !== 'unparsed').pop();
    if (!last && run.tooLong) {
      throw new CliError(`patchwire ${args[0]} printed more than ${MAX_LINE_CHARS / 1024 / 1024} MB in one answer`,
        { hint: `run \`patchwire ${args.join(' ')}\` in a terminal` });
    }
    if (!last) {
      throw new CliError(`patchwire ${args[0]} printed no JSON`, { hint: 'is patchwire.path a patchwire 0.3 or later?' });
    }
    return last;
  }

  /** Sync and ask; events stream to `onEvent`. The prompt goes on stdin ('-'). */
  ask(prompt, { on = null, onEvent = () => {} } = {}) {
    const args = ['ask', '-', '--no-apply', ...(on ? ['--on', on] : [])];
    return this.start(args, { input: prompt, onObject: onEvent });
  }

  /** Sync and queue, then leave (`ask --detach`): {job, detached}. */
  askDetached(prompt) { return this.json(['ask', '-', '--detach'], prompt); }

  /** Several attempts (`ask -n N`): every attempt's events, then an outcome with their table. */
  askAttempts(prompt, attempts, { onEvent = () => {} } = {}) {
    return this.start(['ask', '-', '-n', String(attempts), '--no-apply'], { input: prompt, onObject: onEvent });
  }

  jobs() { return this.json(['jobs']); }

  show(job) { return this.json(['show', job]); }

  diff(job) { return this.json(['diff', job]); }

  // File names come from the box's patch: `--file=NAME` and `-- NAME...`, so a file called
  // `--undo` is a file, never a flag.
  file(job, file, side) { return this.json(['diff', job, `--file=${file}`, '--side', side]); }

  /** Apply without a question (`--yes`), all files or only `paths` (exact names, after `--`);
   * with `sha256` (the hash `diff --json` gave for what was reviewed) the CLI refuses any other
   * patch bytes; `overwriteUntracked` lets it replace files in the way of a new file or a rename. */
  apply(job, paths = [], { keepConflicts = false, overwriteUntracked = false, sha256 = '' } = {}) {
    const options = ['--yes', ...(sha256 ? ['--sha256', sha256] : []), ...(keepConflicts ? ['--keep-conflicts'] : []),
      ...(overwriteUntracked ? ['--overwrite-untracked'] : [])];
    // JOB right before `--`: argparse takes the positionals (JOB -- NAME...) only together
    return this.json(paths.length ? ['apply', ...options, job, '--', ...paths] : ['apply', job, ...options]);
  }

  undo() { return this.json(['apply', '--undo', '--yes']); }

  cancel(job) { return this.json(['cancel', job]); }

  /** The .patchwire.toml's settings that need trust, whether they have it, and their sha256. */
  trustShow() { return this.json(['trust', '--show']); }

  /** Trust the settings, only if their sha256 is still `sha256` (what the user was shown). */
  trust(sha256) { return this.json(['trust', '--sha256', sha256]); }

  doctor() { return this.start(['doctor']).done.then((run) => doctorResult(run)); }
}

/** doctor exits 1 when a check fails, and still prints its checks: both are a result. */
function doctorResult(run) {
  const result = run.objects.filter((o) => Array.isArray(o.checks)).pop();
  if (result) {
    return result;
  }
  throw errorFrom(run);
}

module.exports = {
  Cli, CliError, END_EVENTS, LineSplitter, MAX_LINE_CHARS, errorFrom, findProgram, parseLine, projectFolder,
};
