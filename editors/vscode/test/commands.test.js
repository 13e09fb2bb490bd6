'use strict';
// The command flows with the `vscode` module stubbed and the CLI scripted (fake-patchwire.js).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { createStub, install } = require('./vscode-stub');
const fx = require('./fixtures');

const FAKE = path.join(__dirname, 'fake-patchwire.js');
// every test's folder lives in one, removed when the file's tests end (nothing left in /tmp)
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'pw-cmd-'));
process.on('exit', () => fs.rmSync(TMP, { recursive: true, force: true }));
const MANIFEST = require('../package.json');

/** A project folder, a stubbed VS Code, the extension activated in it, the CLI scripted.
 * `open`: the folder open in VS Code, below the project's (a monorepo's package). */
function setup(plan, { config = true, open = '' } = {}) {
  const dir = fs.realpathSync(fs.mkdtempSync(path.join(TMP, 't-')));
  if (config) {
    fs.writeFileSync(path.join(dir, '.patchwire.toml'), 'agent = "http://127.0.0.1:1"\n');
  }
  if (open) {
    fs.mkdirSync(path.join(dir, open), { recursive: true });
  }
  fs.writeFileSync(path.join(dir, 'scenario.json'), JSON.stringify({ jobs: { stdout: [fx.JOBS] }, ...plan }));
  process.env.FAKE_PATCHWIRE = path.join(dir, 'scenario.json');
  process.env.FAKE_PATCHWIRE_LOG = path.join(dir, 'calls.log');
  const stub = createStub();
  stub.folders = [path.join(dir, open)];
  stub.settings.path = FAKE;
  const uninstall = install(stub);
  const extension = require('../extension');
  const context = { subscriptions: [] };
  const pw = extension.activate(context);
  uninstall();
  const calls = () => (fs.existsSync(process.env.FAKE_PATCHWIRE_LOG)
    ? fs.readFileSync(process.env.FAKE_PATCHWIRE_LOG, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)) : []);
  const run = (name) => stub.commands.get(name)();
  const uiCalls = (name) => stub.calls.filter((c) => c.name === name).map((c) => c.args);
  return { dir, stub, pw, calls, run, uiCalls, context };
}

test('Apply with a package folder open: the unsaved check and the CLI use the project\'s paths', async () => {
  const { dir, stub, calls, run, uiCalls } = setup({ diff: { stdout: [fx.DIFF] } }, { open: 'packages/app' });
  stub.documents = [{ isDirty: true, uri: stub.vscode.Uri.file(path.join(dir, 'src/app.py')) }];
  stub.answers.push(pick((i) => i.job.id === 'aaa111'), pick((i) => i.action === 'all'));
  await run('patchwire.applyJob');
  assert.equal(calls().filter((c) => c.argv[0] === 'apply').length, 0);
  assert.deepEqual(uiCalls('showErrorMessage').map((a) => a[0]), ['Patchwire: unsaved changes in src/app.py (save or revert them, then apply the job again)']);
  assert.ok(calls().every((c) => c.cwd === dir), 'the CLI runs in the project folder');
});

test('Apply refuses under an unsaved editor of a file the change renames away', async () => {
  const renamed = { ...fx.DIFF, files: [{ path: 'lib/new.py', old_path: 'src/app.py', kind: 'renamed', added: 0, removed: 0, binary: false }] };
  const { stub, calls, run, uiCalls } = setup({ diff: { stdout: [renamed] } });
  stub.documents = [{ isDirty: true, uri: stub.vscode.Uri.file(path.join(stub.folders[0], 'src/app.py')) }];
  stub.answers.push(pick((i) => i.job.id === 'aaa111'), pick((i) => i.action === 'all'));
  await run('patchwire.applyJob');
  assert.equal(calls().filter((c) => c.argv[0] === 'apply').length, 0);
  assert.equal(uiCalls('showErrorMessage').length, 1);
});

test('Apply Job offers this project\'s jobs only', async () => {
  const listed = { jobs: [fx.job('aaa111', 'done', 1000), fx.job('eee555', 'done', 4000, { project: 'shop-web', prompt: 'add a deploy script' })],
    project: 'laptop' };
  const { stub, run, uiCalls } = setup({ jobs: { stdout: [listed] } });
  stub.answers.push(() => undefined);
  await run('patchwire.applyJob');
  assert.deepEqual(uiCalls('showQuickPick')[0][0].map((i) => i.job.id), ['aaa111']);
});

/** An answer that picks the quick-pick item matching `test`. */
const pick = (match) => (items) => items.find((i) => match(i));

async function until(condition, what) {
  for (let i = 0; i < 500; i++) {
    if (condition()) {
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const ASK_OK = { ask: { stdout: [...fx.ASK_EVENTS, fx.OUTCOME], stderr: fx.ASK_STDERR } };

test('every contributed command is registered, and only those', () => {
  const { stub } = setup({});
  const contributed = MANIFEST.contributes.commands.map((c) => c.command).sort();
  assert.deepEqual([...stub.commands.keys()].sort(), contributed);
  assert.deepEqual(MANIFEST.contributes.commands.map((c) => `${c.category}: ${c.title}`), [
    'Patchwire: Ask...', 'Patchwire: Ask (detached)...', 'Patchwire: Ask Follow-up...', 'Patchwire: Ask with Several Attempts...', 'Patchwire: Show Jobs', 'Patchwire: Apply Job',
    'Patchwire: Undo Last Apply', 'Patchwire: Cancel Job', 'Patchwire: Doctor', 'Patchwire: Review and Trust Project Settings...']);
  assert.ok(MANIFEST.engines.vscode);
  assert.deepEqual(Object.keys(MANIFEST.dependencies || {}), []);
});

test('Ask: prompt, progress, output channel, multi-file diff, Apply all through apply --yes', async () => {
  const { stub, calls, run, uiCalls } = setup({ ...ASK_OK, diff: { stdout: [fx.DIFF] }, apply: { stdout: [fx.APPLIED] } });
  stub.answers.push('add a --verbose flag', pick((i) => i.action === 'all'));
  await run('patchwire.ask');
  assert.deepEqual(calls().filter((c) => c.argv[0] !== 'jobs').map((c) => c.argv), [
    ['ask', '-', '--no-apply', '--json'], ['diff', fx.JOB, '--json'], ['apply', fx.JOB, '--yes', '--sha256', fx.DIFF.sha256, '--json']]);
  assert.equal(calls().find((c) => c.argv[0] === 'ask').stdin, 'add a --verbose flag');
  assert.deepEqual(uiCalls('withProgress')[0][0], { location: 15, title: 'Patchwire', cancellable: true });
  assert.deepEqual(stub.progress.progress.messages, ['syncing the project', 'queued as job 7aa6964d0087: 2 ahead',
    'queued: 1 ahead', 'running', 'running: looking', 'running: Write src/app.py', 'running: Write new.txt', 'fetching the diff']);
  // The output channel: the CLI's own progress lines, control characters shown escaped.
  const from = stub.output.indexOf('synced 3 of 3 file(s), 236 B in 0.1s');
  assert.deepEqual(stub.output.slice(from, from + 7), ['synced 3 of 3 file(s), 236 B in 0.1s', '   0.0s queued as job 7aa6964d0087, 2 ahead',
    '   0.0s AI started', '   0.0s looking \\x1b]0;title\\x07', '   0.0s > Write src/app.py', '   0.1s AI finished: 2 file(s), +2 -1',
    'applied job 7aa6964d0087 (plain): new.txt, src/app.py']);
  const [changes] = uiCalls('executeCommand').filter((c) => c[0] === 'vscode.changes');
  assert.equal(changes[1], 'Patchwire: job 7aa6964d0087');
  assert.deepEqual(changes[2].map(([file, left, right]) => [file.fsPath, left.toString(), right.toString()]), [
    [path.join(stub.folders[0], 'new.txt'), 'patchwire-job:/new.txt?job=7aa6964d0087&side=old', 'patchwire-job:/new.txt?job=7aa6964d0087&side=new'],
    [path.join(stub.folders[0], 'src/app.py'), 'patchwire-job:/src/app.py?job=7aa6964d0087&side=old', 'patchwire-job:/src/app.py?job=7aa6964d0087&side=new'],
  ]);
  const review = uiCalls('showQuickPick')[0];
  assert.deepEqual(review[0].map((i) => i.label), ['$(check) Apply all 2 files', '$(checklist) Apply selected files...',
    '$(clock) Keep for later', 'Files', '$(diff) new.txt', '$(diff) src/app.py']);
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: applied job 7aa6964d0087: 2 files']);
  assert.deepEqual(uiCalls('showErrorMessage'), []);
});

test('Review: the job\'s egress report is a row of the quick pick, its host names neutralised', async () => {
  const network = { contacted: { 'pub.dev': { allowed: 1 } }, refused: { 'evil.example$(zap)](command:x)': 3 } };
  const { stub, pw, uiCalls } = setup({ diff: { stdout: [{ ...fx.DIFF, network }] } });
  stub.answers.push(pick((i) => i.action === 'keep' && i.label.includes('network')));
  assert.equal(await pw.review(fx.JOB), 'kept');
  const labels = uiCalls('showQuickPick')[0][0].map((i) => i.label);
  assert.deepEqual(labels.slice(3, 4), ['$(warning) network contacted: pub.dev; refused: evil.example$ (zap)] (command:x) x3']);
});

test('Review: the box\'s checks are the first row, their names neutralised', async () => {
  const checks = { passed: false, matches_patch: true, runs: [{ name: 'format', ok: true }, { name: 'test$(zap)', ok: false }] };
  const { stub, pw, uiCalls } = setup({ diff: { stdout: [{ ...fx.DIFF, checks }] } });
  stub.answers.push(pick((i) => i.action === 'keep' && i.label.includes('checks')));
  assert.equal(await pw.review(fx.JOB), 'kept');
  const items = uiCalls('showQuickPick')[0][0];
  assert.equal(items[0].label, '$(error) checks: format ok, test$ (zap) FAILED');
  assert.equal(items[0].description, 'a check failed: look before applying');
});

test('Review: a file opens its diff, look-closely items are flagged, selected files go to --only', async () => {
  const { stub, calls, pw, uiCalls } = setup({ diff: { stdout: [fx.DIFF_LOOK_CLOSELY] }, apply: { stdout: [{ ...fx.APPLIED, files: ['run.sh'], partial: true }] } });
  stub.answers.push(pick((i) => i.path === 'src/app.py'), pick((i) => i.action === 'some'), (items) => items.filter((i) => i.path === 'run.sh'));
  assert.equal(await pw.review(fx.JOB), 'applied');
  const diffs = uiCalls('executeCommand').filter((c) => c[0] === 'vscode.diff');
  assert.deepEqual(diffs.map((d) => [d[1].toString(), d[2].toString(), d[3]]), [[
    'patchwire-job:/src/app.py?job=7aa6964d0087&side=old', 'patchwire-job:/src/app.py?job=7aa6964d0087&side=new',
    'src/app.py (synced ↔ job 7aa6964d0087)']]);
  const [first, , many] = uiCalls('showQuickPick');
  assert.equal(first[0][0].description, ' (2 to look closely at)');
  assert.ok(first[0].some((i) => i.label === '$(warning) .vscode/tasks.json: configures a tool'));
  assert.equal(first[0].find((i) => i.path === 'run.sh').detail, 'look closely: becomes executable');
  assert.equal(many[1].canPickMany, true);
  assert.ok(many[0].every((i) => i.picked));
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'apply').map((c) => c.argv), [['apply', '--json', '--yes', '--sha256', fx.DIFF.sha256, fx.JOB, '--', 'run.sh']]);
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: applied job 7aa6964d0087: 1 file; the rest stays in the job']);
});

test('Review: Keep for later (or Escape) applies nothing', async () => {
  const { stub, calls, pw, uiCalls } = setup({ diff: { stdout: [fx.DIFF] } });
  stub.answers.push(pick((i) => i.action === 'keep'), undefined);
  assert.equal(await pw.review(fx.JOB), 'kept');
  assert.equal(await pw.review(fx.JOB), 'kept');
  assert.equal(calls().filter((c) => c.argv[0] === 'apply').length, 0);
  assert.match(uiCalls('showInformationMessage')[0][0], /kept job 7aa6964d0087; apply it later with "Patchwire: Apply Job"/);
});

test('Apply: overlapping edits show the CLI\'s refusal; the button retries with conflict markers', async () => {
  const overlap = fx.error('the AI\'s change and yours overlap in src/app.py; nothing was changed', 5, 'resolve by hand');
  const { stub, calls, pw, uiCalls } = setup({ diff: { stdout: [fx.DIFF] },
    apply: [{ stdout: [overlap], code: 5 }, { stdout: [{ ...fx.APPLIED, how: '3-way', conflicts: ['src/app.py'] }] }] });
  stub.answers.push(pick((i) => i.action === 'all'), 'Apply with Conflict Markers');
  assert.equal(await pw.review(fx.JOB), 'applied');
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'apply').map((c) => c.argv.slice(2)), [['--yes', '--sha256', fx.DIFF.sha256, '--json'], ['--yes', '--sha256', fx.DIFF.sha256, '--keep-conflicts', '--json']]);
  assert.deepEqual(uiCalls('showWarningMessage').map((a) => a[0]), [
    'Patchwire: the AI\'s change and yours overlap in src/app.py; nothing was changed (resolve by hand)',
    'Patchwire: conflict markers to resolve in src/app.py']);
});

test('Apply: files in the way are named in a warning; Overwrite retries with --overwrite-untracked, dismissing writes nothing', async () => {
  const inTheWay = fx.error('.env (ignored, 24 bytes) is already here, not part of what you reviewed: the patch would replace '
    + 'it (a new file or a rename lands there); nothing was changed', 5, 'look at it; then `patchwire apply ...`', 'in_the_way');
  const { stub, calls, pw, uiCalls } = setup({ diff: { stdout: [fx.DIFF] },
    apply: [{ stdout: [inTheWay], code: 5 }, { stdout: [{ ...fx.APPLIED, replaced: ['.env'] }] }, { stdout: [inTheWay], code: 5 }] });
  stub.answers.push(pick((i) => i.action === 'all'), 'Overwrite');
  assert.equal(await pw.review(fx.JOB), 'applied');
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'apply').map((c) => c.argv.slice(2)), [
    ['--yes', '--sha256', fx.DIFF.sha256, '--json'], ['--yes', '--sha256', fx.DIFF.sha256, '--overwrite-untracked', '--json']]);
  const [warning] = uiCalls('showWarningMessage');
  assert.equal(warning[0], 'Patchwire: .env (ignored, 24 bytes) is already here, not part of what you reviewed: the patch '
    + 'would replace it (a new file or a rename lands there); nothing was changed. Overwrite replaces what is there; Undo Last Apply puts it back.');
  assert.deepEqual(warning.slice(1), ['Overwrite']);
  stub.answers.push(pick((i) => i.action === 'all'), undefined);
  assert.equal(await pw.review(fx.JOB), 'refused');
  assert.equal(calls().filter((c) => c.argv[0] === 'apply').length, 3);
});

test('Apply refuses to write under unsaved editors', async () => {
  const { stub, calls, run, uiCalls } = setup({ diff: { stdout: [fx.DIFF] } });
  stub.documents = [{ isDirty: true, uri: stub.vscode.Uri.file(path.join(stub.folders[0], 'src/app.py')) }];
  stub.answers.push(pick((i) => i.job.id === 'aaa111'), pick((i) => i.action === 'all'));
  await run('patchwire.applyJob');
  assert.equal(calls().filter((c) => c.argv[0] === 'apply').length, 0);
  assert.deepEqual(uiCalls('showErrorMessage').map((a) => a[0]), ['Patchwire: unsaved changes in src/app.py (save or revert them, then apply the job again)']);
});

test('Cancelling the notification while the job runs cancels it on the box', async () => {
  const { stub, calls, run, uiCalls } = setup({
    ask: { stdout: fx.ASK_EVENTS.slice(0, 3), stderr: '   0.0s AI started\n', hold: true, code: 4,
      after: [{ seq: 4, job: fx.JOB, type: 'cancelled', reason: 'cancelled by alice' }, fx.error(`job ${fx.JOB} cancelled: cancelled by alice`, 4)] },
    cancel: { stdout: [{ job: { id: fx.JOB, status: 'cancelled' } }] },
  });
  stub.answers.push('do a long thing');
  const done = run('patchwire.ask');
  await until(() => stub.progress && stub.progress.progress.messages.includes('running'), 'the started event');
  stub.progress.cancel();
  await done;
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'cancel').map((c) => c.argv), [['cancel', fx.JOB, '--json']]);
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), [`Patchwire: job ${fx.JOB} cancelled`]);
  assert.deepEqual(uiCalls('showErrorMessage'), []);
  assert.equal(calls().filter((c) => c.argv[0] === 'diff').length, 0);
});

test('Cancelling while syncing stops the CLI before the job exists', async () => {
  const { stub, calls, run, uiCalls } = setup({ ask: { stdout: [], hold: true } });
  stub.answers.push('do a thing');
  const done = run('patchwire.ask');
  await until(() => calls().some((c) => c.argv[0] === 'ask'), 'the ask to start');
  stub.progress.cancel();
  await done;
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: ask cancelled before it reached the box']);
  assert.equal(calls().filter((c) => c.argv[0] === 'cancel').length, 0);
});

test('Ask: a refusal is shown in the CLI\'s words, with the output a click away', async () => {
  const { stub, run, uiCalls } = setup({ ask: { stdout: [fx.error('the agent refused: invalid token', 3, 'check the token file named in .patchwire.toml', '401')], code: 3 } });
  stub.answers.push('x', 'Show Output');
  await run('patchwire.ask');
  assert.deepEqual(uiCalls('showErrorMessage'), [['Patchwire: the agent refused: invalid token (check the token file named in .patchwire.toml)', 'Show Output']]);
  const names = () => stub.calls.map((c) => c.name);
  await until(() => names().lastIndexOf('output.show') > names().indexOf('showErrorMessage'), 'Show Output to show the channel');
});

test('Ask adds the selection as context when chosen; Escape backs out', async () => {
  const { stub, calls, run } = setup(ASK_OK);
  const file = stub.vscode.Uri.file(path.join(stub.folders[0], 'src', 'app.py'));
  const sel = { isEmpty: false, start: { line: 1 }, end: { line: 2 } };
  stub.vscode.window.activeTextEditor = { document: { uri: file, getText: () => 'line2\nline3' }, selection: sel };
  stub.answers.push('explain', pick((i) => i.context && i.context.kind === 'selection'), undefined);
  await run('patchwire.ask');
  assert.equal(calls().find((c) => c.argv[0] === 'ask').stdin, 'explain\n\nContext: lines 2-3 of src/app.py:\n```\nline2\nline3\n```');
  stub.answers.push('again', undefined);
  const before = calls().length;
  await run('patchwire.ask');
  assert.equal(calls().slice(before).filter((c) => c.argv[0] === 'ask').length, 0);
});

test('Ask Follow-up continues the picked job with --on', async () => {
  const { stub, calls, run, uiCalls } = setup({ ...ASK_OK, diff: { stdout: [{ ...fx.DIFF, files: [] }] } });
  stub.answers.push(pick((i) => i.job.id === 'aaa111'), 'now add tests');
  await run('patchwire.askFollowUp');
  assert.deepEqual(uiCalls('showQuickPick')[0][0].map((i) => i.job.id), ['aaa111']); // only finished jobs
  assert.deepEqual(calls().find((c) => c.argv[0] === 'ask').argv, ['ask', '-', '--no-apply', '--on', 'aaa111', '--json']);
});

test('Ask (detached) queues with ask --detach; the status refresh tells when it ends, Review opens it', async () => {
  const queued = { jobs: [fx.job('eee555', 'queued', 4000)] };
  const link = 'boom [x](command:workbench.action.terminal.sendSequence) $(check)';
  const { stub, pw, calls, run, uiCalls } = setup({
    ask: { stdout: [{ type: 'outcome', job: 'eee555', detached: true, applied: false }] },
    jobs: [{ stdout: [queued] }, { stdout: [queued] }, { stdout: [queued] },
      { stdout: [{ jobs: [fx.job('eee555', 'done', 4000, { stats: { files: 2 } }), fx.job('fff666', 'failed', 10, { reason: link })] }] }],
    diff: { stdout: [{ ...fx.DIFF, job: 'eee555', files: [] }] },
  });
  stub.answers.push('upgrade everything');
  await run('patchwire.askDetached');
  assert.deepEqual(calls().find((c) => c.argv[0] === 'ask').argv, ['ask', '-', '--detach', '--json']);
  assert.equal(calls().find((c) => c.argv[0] === 'ask').stdin, 'upgrade everything');
  assert.equal(uiCalls('withProgress').length, 0); // nothing to watch: the window is free
  await until(() => calls().filter((c) => c.argv[0] === 'jobs').length >= 2, 'the refreshes after the ask');
  await pw.refreshStatus(); // still queued: nothing said yet
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]),
    ['Patchwire: job eee555 is queued on the box; you will be told when it ends']);
  stub.answers.push('Review');
  await pw.refreshStatus(); // done now; fff666 failed too, but was not asked detached here
  await until(() => calls().some((c) => c.argv[0] === 'diff'), 'Review to open the job');
  assert.deepEqual(uiCalls('showInformationMessage')[1], ['Patchwire: job eee555 is done: 2 files changed', 'Review']);
  assert.deepEqual(uiCalls('showWarningMessage'), []);
  await pw.refreshStatus(); // told once
  assert.equal(uiCalls('showInformationMessage').filter((a) => /eee555 is done/.test(a[0])).length, 1);
});

test('a detached job that failed is told with its reason, box text made plain', async () => {
  const link = 'boom [x](command:workbench.action.terminal.sendSequence) $(check)';
  const { pw, uiCalls } = setup({ jobs: { stdout: [{ jobs: [fx.job('fff666', 'failed', 10, { reason: link })] }] } });
  pw.detached.add('fff666');
  await pw.refreshStatus();
  const [[text]] = uiCalls('showWarningMessage');
  assert.match(text, /^Patchwire: job fff666 failed: boom \[x\] \(command:/);
  assert.doesNotMatch(text, /\]\(|\$\(/);
});

test('no patchwire program: the error offers the setting', async () => {
  const { stub, run, uiCalls } = setup({});
  stub.settings.path = '/nonexistent/patchwire';
  stub.answers.push('Open Settings');
  await run('patchwire.showJobs');
  assert.deepEqual(uiCalls('showErrorMessage'), [['Patchwire: the patchwire program was not found (set patchwire.path in the settings, or put patchwire on PATH or in ~/bin)', 'Open Settings']]);
  await until(() => uiCalls('executeCommand').some((c) => c[0] === 'workbench.action.openSettings'), 'the settings to open');
  assert.deepEqual(uiCalls('executeCommand').pop(), ['workbench.action.openSettings', 'patchwire.path']);
  await until(() => stub.statusItem.text === '$(warning) Patchwire', 'the status bar to show the failure');
});

test('no .patchwire.toml in the workspace is said plainly', async () => {
  const { run, uiCalls } = setup({}, { config: false });
  await run('patchwire.doctor');
  assert.match(uiCalls('showErrorMessage')[0][0], /^Patchwire: no .patchwire.toml in this workspace \(run `patchwire init`/);
});

test('the status bar shows your running and waiting jobs and opens Show Jobs', async () => {
  const { stub, pw } = setup({});
  await pw.refreshStatus();
  assert.equal(stub.statusItem.text, '$(sync~spin) Patchwire: 1 running, 1 waiting');
  assert.equal(stub.statusItem.command, 'patchwire.showJobs');
  assert.ok(stub.statusItem.shown);
});

test('Show Jobs lists newest first; Cancel Job and Undo go through the CLI', async () => {
  const { stub, calls, run, uiCalls } = setup({ cancel: { stdout: [{ job: { id: 'bbb222', status: 'cancelled' } }] }, undo: { stdout: [{ restored: ['src/app.py'] }] } });
  stub.answers.push(undefined);
  await run('patchwire.showJobs');
  assert.deepEqual(uiCalls('showQuickPick')[0][0].map((i) => i.job.id), ['bbb222', 'ccc333', 'aaa111', 'ddd444']);
  stub.answers.push((items) => { assert.deepEqual(items.map((i) => i.job.id), ['bbb222', 'ccc333']); return items[0]; });
  await run('patchwire.cancelJob');
  stub.answers.push('Undo Apply');
  await run('patchwire.undoApply');
  assert.deepEqual(calls().filter((c) => c.argv[0] !== 'jobs').map((c) => c.argv), [['cancel', 'bbb222', '--json'], ['apply', '--undo', '--yes', '--json']]);
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: job bbb222 is cancelled', 'Patchwire: restored 1 file']);
});

test('Cancel Job with nothing running says so and runs nothing', async () => {
  const { calls, run, uiCalls } = setup({ jobs: { stdout: [{ jobs: [fx.JOBS.jobs[0]] }] } });
  await run('patchwire.cancelJob');
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: none of your jobs is queued or running']);
  assert.deepEqual(calls().filter((c) => c.argv[0] !== 'jobs'), []);
});

test('Doctor: failing checks and their fixes go to the output channel and an error', async () => {
  const checks = [{ name: 'git', ok: true, detail: 'git version 2.39.5' }, { name: 'agent', ok: false, detail: 'cannot reach the agent', fix: 'start patchwire-agent serve' }];
  const { stub, run, uiCalls } = setup({ doctor: { stdout: [{ ok: false, checks }], code: 1 } });
  await run('patchwire.doctor');
  assert.deepEqual(stub.output.slice(-3), ['ok   git: git version 2.39.5', 'FAIL agent: cannot reach the agent', '     fix: start patchwire-agent serve']);
  assert.deepEqual(uiCalls('showErrorMessage').map((a) => a[0]), ['Patchwire doctor: agent: cannot reach the agent']);
});

const SHOWN = {
  config: '/p/.patchwire.toml', trusted: false, sha256: 'ab'.repeat(32),
  settings: { agent: 'http://evil.example:8', 'sync.rsync': './tools/[x](command:workbench.action.terminal.new)', 'sync.allow': ['*'] },
};
const UNTRUSTED = { stdout: [fx.error('/p/.patchwire.toml is not trusted here: ...', 2, 'run `patchwire trust` in /p', 'untrusted')], code: 2 };

test('an untrusted .patchwire.toml: Review and Trust shows its settings, and trusts only what was shown', async () => {
  const { stub, calls, run, uiCalls } = setup({ doctor: UNTRUSTED,
    trust: [{ stdout: [SHOWN] }, { stdout: [{ ...SHOWN, trusted: true }] }] });
  stub.answers.push('Review and Trust...', 'Trust');
  await run('patchwire.doctor');
  await until(() => uiCalls('showInformationMessage').length, 'the trust to end');
  assert.deepEqual(uiCalls('showErrorMessage')[0].slice(1), ['Review and Trust...', 'Show Output']);
  const [question, options, button] = uiCalls('showWarningMessage')[0];
  assert.equal(question, 'Patchwire: trust /p/.patchwire.toml?');
  assert.equal(options.modal, true);
  assert.equal(button, 'Trust');
  // each setting as written, a command link in one of them broken up so that it runs nothing
  assert.match(options.detail, /\nagent = "http:\/\/evil.example:8"\nsync.rsync = "\.\/tools\/\[x\] \(command:workbench[^\n]*\nsync.allow = \["\*"\]$/);
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'trust').map((c) => c.argv),
    [['trust', '--show', '--json'], ['trust', '--sha256', SHOWN.sha256, '--json']]);
  assert.deepEqual(uiCalls('showInformationMessage').map((a) => a[0]), ['Patchwire: trusted /p/.patchwire.toml']);
});

test('Review and Trust closed without Trust trusts nothing; other errors offer no trust', async () => {
  const { stub, calls, run, uiCalls } = setup({ trust: [{ stdout: [SHOWN] }],
    doctor: { stdout: [fx.error('cannot reach the agent', 3)], code: 3 } });
  stub.answers.push(undefined);
  await run('patchwire.trust');
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'trust').map((c) => c.argv), [['trust', '--show', '--json']]);
  assert.deepEqual(uiCalls('showInformationMessage'), []);
  await run('patchwire.doctor');
  assert.deepEqual(uiCalls('showErrorMessage')[0], ['Patchwire: cannot reach the agent', 'Show Output']);
});

test('settings changed between showing and trusting: the CLI\'s refusal is shown, nothing trusted', async () => {
  const { stub, run, uiCalls } = setup({ trust: [{ stdout: [SHOWN] },
    { stdout: [fx.error("/p/.patchwire.toml's settings changed since they were shown: nothing was trusted", 2, 'look at them again', 'changed')], code: 2 }] });
  stub.answers.push('Trust');
  await run('patchwire.trust');
  await until(() => uiCalls('showErrorMessage').length, 'the refusal');
  assert.match(uiCalls('showErrorMessage')[0][0], /settings changed since they were shown: nothing was trusted/);
  assert.deepEqual(uiCalls('showInformationMessage'), []);
});

test('Notifications: a sandbox warning, a cancel status and conflict names from the box run no command', async () => {
  const link = '[fix](command:workbench.action.terminal.sendSequence?%7B%22text%22%3A%22id%5Cn%22%7D)';
  const checks = [{ name: 'sandbox', ok: false, detail: `unconfined ${link} $(check)`, fix: 'x' }];
  const { run, uiCalls } = setup({ doctor: { stdout: [{ ok: false, checks }], code: 1 } });
  await run('patchwire.doctor');
  const shown = uiCalls('showErrorMessage').map((a) => a[0]).join('\n');
  assert.match(shown, /unconfined \[fix\] \(command:/);
  assert.doesNotMatch(shown, /\]\(|\$\(/);
});

test('the diff editor\'s sides come from diff --file --side, read-only text', async () => {
  const { stub, calls } = setup({ diff: [
    { stdout: [{ job: fx.JOB, path: 'src/app.py', side: 'old', exists: true, mode: '100644', binary: false, text: "print('hello')\n" }] },
    { stdout: [{ job: fx.JOB, path: 'logo.png', side: 'new', exists: true, mode: '100644', binary: true, base64: 'iVBO' }] },
    { stdout: [{ job: fx.JOB, path: 'gone.txt', side: 'new', exists: false, mode: '', binary: false, text: '' }] },
    { stdout: [fx.error('the agent refused: no job', 3)], code: 3 },
    { stdout: [{ job: fx.JOB, path: 'later.txt', side: 'new', exists: true, mode: '100644', binary: false, text: 'ok\n' }] },
  ] });
  const uri = (p, side) => stub.vscode.Uri.from({ scheme: 'patchwire-job', path: '/' + p, query: `job=${fx.JOB}&side=${side}` });
  // text that is not UTF-8 is shown byte by byte, so that any change to it shows
  const { sideText } = require('../lib/commands');
  assert.equal(sideText({ exists: true, mode: '100644', binary: false, base64: Buffer.from('caf\xe9 \xff\n', 'latin1').toString('base64') }),
    '(not UTF-8: each byte shown as a Latin-1 character)\ncaf\xe9 \xff\n');
  assert.equal(await stub.provider.provideTextDocumentContent(uri('src/app.py', 'old')), "print('hello')\n");
  assert.equal(await stub.provider.provideTextDocumentContent(uri('src/app.py', 'old')), "print('hello')\n"); // cached
  assert.equal(await stub.provider.provideTextDocumentContent(uri('logo.png', 'new')), '(binary file, not shown; mode 100644)');
  assert.equal(await stub.provider.provideTextDocumentContent(uri('gone.txt', 'new')), '');
  assert.equal(await stub.provider.provideTextDocumentContent(uri('later.txt', 'new')), '(Patchwire could not read this file: the agent refused: no job)');
  assert.equal(await stub.provider.provideTextDocumentContent(uri('later.txt', 'new')), 'ok\n'); // a failure is not cached
  assert.deepEqual(calls().filter((c) => c.argv[0] !== 'jobs').map((c) => c.argv), [
    ['diff', fx.JOB, '--file=src/app.py', '--side', 'old', '--json'],
    ['diff', fx.JOB, '--file=logo.png', '--side', 'new', '--json'],
    ['diff', fx.JOB, '--file=gone.txt', '--side', 'new', '--json'],
    ['diff', fx.JOB, '--file=later.txt', '--side', 'new', '--json'],
    ['diff', fx.JOB, '--file=later.txt', '--side', 'new', '--json']]);
});

test('Ask with Several Attempts: ask -n N, a quick pick of the attempts, then one attempt\'s review', async () => {
  const second = 'b1f9c0290ea5';
  const outcome = {
    type: 'outcome', ask: '982b04e614e0', applied: false,
    attempts: [
      { attempt: 1, job: fx.JOB, status: 'done', agent: null, files: 2, added: 2, removed: 0, seconds: 1.5, cost_usd: 0.0123, problem: '' },
      { attempt: 2, job: second, status: 'done', agent: 'deep', files: 3, added: 3, removed: 1, seconds: 2, cost_usd: null, problem: '' },
      { attempt: 3, job: 'd21c86281130', status: 'failed', agent: null, files: 0, added: 0, removed: 0, seconds: null, cost_usd: null, problem: 'API Error' },
    ],
    differences: [{ attempts: [1, 2], paths: ['a', 'b', 'c'] }],
  };
  const events = [{ seq: 1, job: fx.JOB, type: 'queued' }, { seq: 1, job: second, type: 'queued' },
    { seq: 2, job: fx.JOB, type: 'finished', status: 'done' }, { seq: 2, job: second, type: 'finished', status: 'done' }];
  const { stub, calls, run, uiCalls } = setup({ ask: { stdout: [...events, outcome] }, diff: { stdout: [{ ...fx.DIFF, job: second }] },
    apply: { stdout: [{ ...fx.APPLIED, job: second, files: ['src/app.py'], partial: true }] } });
  stub.answers.push('try it', pick((i) => i.n === '3'), pick((i) => i.label.includes('Attempt 2')),
    pick((i) => i.action === 'some'), (items) => items.filter((i) => i.path === 'src/app.py'));
  await run('patchwire.askAttempts');
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'ask').map((c) => c.argv), [['ask', '-', '-n', '3', '--no-apply', '--json']]);
  const items = uiCalls('showQuickPick')[1][0];
  assert.deepEqual(items.map((i) => [i.label, i.description, i.detail, i.job]), [
    ['$(git-compare) Attempt 1', '2 files +2 -0 · 1.5s · $0.0123', '', fx.JOB],
    ['$(git-compare) Attempt 2 (deep)', '3 files +3 -1 · 2s', 'differs from 1 in 3 files', second],
    ['$(error) Attempt 3', 'failed', 'API Error', null]]);
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'apply').map((c) => c.argv),
    [['apply', '--json', '--yes', '--sha256', fx.DIFF.sha256, second, '--', 'src/app.py']]);
});

test('Ask with Several Attempts: cancelled before any event, the attempts the CLI names are cancelled on the box', async () => {
  const second = 'b1f9c0290ea5';
  const { stub, calls, run } = setup({
    ask: { stdout: [], hold: true, interrupted: { error: 'left ask 982b04e614e0; its attempts keep running on the box', hint: '',
      exit_status: 130, details: { ask: '982b04e614e0', jobs: [fx.JOB, second] } } },
    cancel: { stdout: [{ job: { id: fx.JOB, status: 'cancelled' } }] },
  });
  stub.answers.push('try it', pick((i) => i.n === '2'));
  const done = run('patchwire.askAttempts');
  await until(() => calls().some((c) => c.argv[0] === 'ask'), 'the ask to start');
  stub.progress.cancel();
  await done;
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'cancel').map((c) => c.argv[1]).sort(), [fx.JOB, second].sort());
});

test('Ask with Several Attempts: "apply one file from attempt K" applies that file of that attempt only', async () => {
  const second = 'b1f9c0290ea5';
  const outcome = {
    type: 'outcome', ask: '982b04e614e0', applied: false, differences: [],
    attempts: [
      { attempt: 1, job: fx.JOB, status: 'done', agent: null, files: 2, added: 2, removed: 0, seconds: 1, cost_usd: null, problem: '' },
      { attempt: 2, job: second, status: 'done', agent: null, files: 2, added: 2, removed: 0, seconds: 1, cost_usd: null, problem: '' },
    ],
  };
  const { stub, calls, run, uiCalls } = setup({ ask: { stdout: [outcome] }, diff: { stdout: [{ ...fx.DIFF_LOOK_CLOSELY, job: second }] },
    apply: { stdout: [{ ...fx.APPLIED, job: second, files: ['run.sh'], partial: true }] } });
  stub.answers.push('try it', pick((i) => i.n === '2'), pick((i) => i.attempt === 2),
    pick((i) => i.action === 'one'), pick((i) => i.path === 'run.sh'));
  await run('patchwire.askAttempts');
  const [, , review, one] = uiCalls('showQuickPick');
  assert.equal(review[1].title, `Patchwire: attempt 2, job ${second}, 3 files`);
  assert.ok(review[0].some((i) => i.label === '$(file) Apply one file from attempt 2...'));
  assert.equal(one[1].title, `Patchwire: the file to apply from attempt 2 (job ${second})`);
  assert.notEqual(one[1].canPickMany, true);
  assert.deepEqual(calls().filter((c) => c.argv[0] === 'apply').map((c) => c.argv),
    [['apply', '--json', '--yes', '--sha256', fx.DIFF.sha256, second, '--', 'run.sh']]);
});

test('Review of a job that is no attempt offers no "one file from attempt"', () => {
  const { reviewItems } = require('../lib/commands');
  assert.ok(!reviewItems([], [], null, null).some((i) => i.action === 'one'));
});
