#!/usr/bin/env node
'use strict';
// A scripted stand-in for the `patchwire` CLI in the unit tests: it answers each command from
// the scenario file named by FAKE_PATCHWIRE (a JSON object keyed by command: "ask", "diff",
// "undo" for `apply --undo`, ...; a list: one plan per call), as the real CLI would: JSON lines on stdout, progress on
// stderr, an exit status. It logs its argv, cwd and stdin to FAKE_PATCHWIRE_LOG. `ask` with
// "hold": true waits after its first lines until `cancel` runs (then prints "after") or until
// SIGINT (then prints "interrupted" and exits 130, as the CLI's Ctrl-C does). The real CLI is exercised by
// tests/test_vscode.py (its CLI layer) and tests/test_vscode_e2e.py.
const fs = require('fs');

const argv = process.argv.slice(2);
const scenario = JSON.parse(fs.readFileSync(process.env.FAKE_PATCHWIRE, 'utf8'));
const log = process.env.FAKE_PATCHWIRE_LOG;
const flags = argv.includes('--') ? argv.slice(0, argv.indexOf('--')) : argv; // after --: file names
const key = argv[0] === 'apply' && flags.includes('--undo') ? 'undo' : argv[0];
const earlier = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter((l) => l && JSON.parse(l).argv[0] === argv[0]).length : 0;
// A list answers its first call with the first plan, the second with the second, and so on.
const plans = [].concat(scenario[key] || { stdout: [{ error: `no scenario for ${key}`, hint: '', exit_status: 2 }], code: 2 });
const plan = plans[Math.min(earlier, plans.length - 1)];
const cancelled = log + '.cancelled';

process.on('SIGINT', () => {  // the plan's "interrupted": the error the CLI prints then (jobs it left)
  process.stderr.write('patchwire: interrupted\n');
  process.stdout.write(JSON.stringify(plan.interrupted || { error: 'interrupted', hint: '', exit_status: 130 }) + '\n');
  process.exit(130);
});

let stdin = '';
process.stdin.on('data', (c) => { stdin += c; });
process.stdin.on('end', () => {
  fs.appendFileSync(log, JSON.stringify({ argv, cwd: process.cwd(), stdin }) + '\n');
  if (key === 'cancel') {
    fs.writeFileSync(cancelled, '');
  }
  if (plan.stderr) {
    process.stderr.write(plan.stderr);
  }
  // Written in two chunks mid-line: the extension must join lines that arrive in pieces.
  const text = (plan.stdout || []).map((o) => JSON.stringify(o) + '\n').join('');
  process.stdout.write(text.slice(0, Math.floor(text.length / 2)));
  setTimeout(() => {
    process.stdout.write(text.slice(Math.floor(text.length / 2)));
    if (!plan.hold) {
      process.exitCode = plan.code || 0;
      return;
    }
    const deadline = Date.now() + 10000;
    const timer = setInterval(() => {
      if (fs.existsSync(cancelled) || Date.now() > deadline) {
        clearInterval(timer);
        process.stdout.write((plan.after || []).map((o) => JSON.stringify(o) + '\n').join(''));
        process.exitCode = plan.code || 0;
      }
    }, 20);
  }, 20);
});
