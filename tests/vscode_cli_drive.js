'use strict';
// Drives the REAL patchwire CLI through the VS Code extension's own CLI layer
// (editors/vscode/lib/cli.js, which needs no `vscode`), for tests/test_vscode.py.
// usage: node vscode_cli_drive.js PROGRAM SCENARIO < prompt     Prints one JSON summary.
const path = require('path');
const { Cli, CliError } = require(path.join(__dirname, '..', 'editors', 'vscode', 'lib', 'cli.js'));

const [program, scenario] = process.argv.slice(2);
const cli = new Cli({ program, cwd: process.cwd(), log: (line) => stderr.push(line) });
const stderr = [];

async function settle(promise) {
  try {
    return { ok: await promise };
  } catch (e) {
    return { error: e.message, hint: e.hint, exitStatus: e.exitStatus, code: e.code, cliError: e instanceof CliError };
  }
}

/** Ask; `onStarted(job)` runs once the AI has started. */
async function ask(prompt, onStarted = null) {
  const events = [];
  let job = null;
  const proc = cli.ask(prompt, {
    onEvent: (e) => {
      events.push(e);
      job = job || e.job;
      if (e.type === 'started' && onStarted) {
        onStarted(job);
      }
    },
  });
  const run = await proc.done;
  return { job, code: run.code, types: events.map((e) => e.type), last: events[events.length - 1] };
}

const SCENARIOS = {
  async review(prompt) {
    const asked = await ask(prompt);
    const diff = await cli.diff(asked.job);
    const sides = {};
    for (const f of diff.files) {
      sides[f.path] = { old: await cli.file(asked.job, f.old_path, 'old'), new: await cli.file(asked.job, f.path, 'new') };
    }
    const applied = await settle(cli.apply(asked.job, [diff.files.find((f) => f.path.includes('*')).path]));
    const jobs = await cli.jobs();
    return { asked, diff, sides, applied, jobs: jobs.jobs.map((j) => [j.id, j.status]) };
  },
  async undo() {
    return settle(cli.undo());
  },
  async cancel(prompt) {
    let cancelled = null;
    const asked = await ask(prompt, (job) => { cancelled = settle(cli.cancel(job)); });
    return { asked, cancel: await cancelled };
  },
  async trust() {  // refused as untrusted, shown, a stale hash refused, trusted, then used
    const before = await settle(cli.jobs());
    const shown = await settle(cli.trustShow());
    const stale = await settle(cli.trust('0'.repeat(64)));
    const trusted = shown.ok ? await settle(cli.trust(shown.ok.sha256)) : null;
    return { before, shown, stale, trusted, after: await settle(cli.jobs()) };
  },
  async refused() {
    return { apply: await settle(cli.apply('abc123')), doctor: await settle(cli.doctor()) };
  },
};

let input = '';
process.stdin.on('data', (c) => { input += c; });
process.stdin.on('end', async () => {
  const result = await SCENARIOS[scenario](input);
  process.stdout.write(JSON.stringify({ ...result, stderr }) + '\n');
});
