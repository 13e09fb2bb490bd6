'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { Cli, CliError, LineSplitter, errorFrom, findProgram, parseLine, projectFolder } = require('../lib/cli');
const fx = require('./fixtures');

const FAKE = path.join(__dirname, 'fake-patchwire.js');
// every test's folder lives in one, removed when the file's tests end (nothing left in /tmp)
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'pw-cli-'));
process.on('exit', () => fs.rmSync(TMP, { recursive: true, force: true }));

function scenario(plan) {
  const dir = fs.mkdtempSync(path.join(TMP, 't-'));
  const file = path.join(dir, 'scenario.json');
  fs.writeFileSync(file, JSON.stringify(plan));
  const log = path.join(dir, 'calls.log');
  const env = { ...process.env, FAKE_PATCHWIRE: file, FAKE_PATCHWIRE_LOG: log };
  const calls = () => (fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)) : []);
  return { dir, cli: new Cli({ program: FAKE, cwd: dir, env, log: (l) => logged.push(l) }), calls };
}
const logged = [];

test('lines that arrive in pieces, split inside a character, are joined', () => {
  const s = new LineSplitter();
  const bytes = Buffer.from('{"text": "é"}\n{"a"');
  assert.deepEqual(s.push(bytes.subarray(0, 12)), []);
  assert.deepEqual(s.push(bytes.subarray(12)), ['{"text": "é"}']);
  assert.deepEqual(s.push(Buffer.from(': 1}\n\n')), ['{"a": 1}']);
  assert.deepEqual(s.push(Buffer.from('{"b": 2}')), []);
  assert.deepEqual(s.end(), ['{"b": 2}']);
});

test('a line longer than the cap is dropped as it comes, the lines after it kept', () => {
  const s = new LineSplitter(10);
  assert.deepEqual(s.push(Buffer.from('{"a": 1}\n0123456')), ['{"a": 1}']);
  assert.deepEqual(s.push(Buffer.from('789abcdef')), []);
  assert.equal(s.pieces.length, 2); // nothing past the cap is held
  const [tooLong, next] = s.push(Buffer.from('xyz\n{"b": 2}\n'));
  assert.equal(parseLine(tooLong).type, 'unparsed');
  assert.match(parseLine(tooLong).text, /a line of more than/);
  assert.equal(next, '{"b": 2}');
  assert.deepEqual(s.push(Buffer.from('0123456789abc')), []);
  assert.equal(parseLine(s.end()[0]).type, 'unparsed');
});

test('a long line in many chunks is held as its pieces until its end, then joined once', () => {
  const s = new LineSplitter();
  const chunk = Buffer.from('x'.repeat(64 * 1024));
  for (let i = 0; i < 256; i++) { // 16 MB in 64 KB chunks: the old splitter joined and split it 256 times
    assert.deepEqual(s.push(chunk), []);
  }
  assert.equal(s.pieces.length, 256);
  assert.equal(s.push(Buffer.from('\n'))[0].length, 16 * 1024 * 1024);
  assert.deepEqual([s.pieces, s.size], [[''], 0]);
});

test('a run keeps its results, not its events, and a bounded tail of stderr', async () => {
  const events = Array.from({ length: 3000 }, (_, i) => ({ type: 'text', text: `line ${i}` }));
  const { cli } = scenario({ ask: { stdout: [...events, { type: 'outcome', job: 'j1' }], stderr: 'e'.repeat(200 * 1024) + '\nlast\n' } });
  let seen = 0;
  const run = await cli.start(['ask', '-'], { onObject: () => { seen += 1; } }).done;
  assert.equal(seen, 3001);
  assert.deepEqual(run.objects, [{ type: 'outcome', job: 'j1' }]);
  assert.ok(run.stderr.length <= 64 * 1024 && run.stderr.endsWith('last\n'));
});

test('a line that is not a JSON object is kept as text', () => {
  assert.deepEqual(parseLine('{"type": "text", "text": "hi"}'), { type: 'text', text: 'hi' });
  assert.deepEqual(parseLine('[1, 2]'), { type: 'unparsed', text: '[1, 2]' });
  assert.deepEqual(parseLine('Traceback (most recent'), { type: 'unparsed', text: 'Traceback (most recent' });
});

test('the CLI\'s own error line wins over stderr; without it, the tail of stderr', () => {
  const e = errorFrom({ code: 3, objects: [fx.ASK_EVENTS[0], fx.error('the agent refused: no job \'x\'', 3, '', 'not_found')], stderr: 'patchwire: ...\n' });
  assert.ok(e instanceof CliError);
  assert.equal(e.message, 'the agent refused: no job \'x\'');
  assert.equal(e.exitStatus, 3);
  assert.equal(e.code, 'not_found');
  const crash = errorFrom({ code: 1, objects: [], stderr: 'a\nb\nc\nValueError: boom\n' });
  assert.equal(crash.message, 'patchwire exited with status 1: b\nc\nValueError: boom');
  assert.match(errorFrom({ code: null, signal: 'SIGKILL', objects: [], stderr: '' }).message, /stopped \(SIGKILL\)/);
});

test('file names from the box go after --, so a file called --undo is a file', async () => {
  const { cli, calls } = scenario({ apply: { stdout: [fx.APPLIED] }, diff: { stdout: [{ text: '' }] } });
  await cli.apply('j1', ['--undo', '-i', 'src/app.py']);
  await cli.file('j1', '--undo', 'new');
  assert.deepEqual(calls().map((c) => c.argv), [
    ['apply', '--json', '--yes', 'j1', '--', '--undo', '-i', 'src/app.py'],
    ['diff', 'j1', '--file=--undo', '--side', 'new', '--json'],
  ]);
});

test('the program: the setting, then PATH, then ~/bin/patchwire', () => {
  const dir = fs.mkdtempSync(path.join(TMP, 'find-'));
  const home = path.join(dir, 'home');
  const onPath = path.join(dir, 'path');
  fs.mkdirSync(path.join(home, 'bin'), { recursive: true });
  fs.mkdirSync(onPath);
  const inHome = path.join(home, 'bin', 'patchwire');
  fs.writeFileSync(inHome, '#!/bin/sh\n', { mode: 0o755 });
  assert.equal(findProgram('', { PATH: onPath }, home), inHome);
  fs.writeFileSync(path.join(onPath, 'patchwire'), '#!/bin/sh\n', { mode: 0o755 });
  assert.equal(findProgram('', { PATH: onPath }, home), path.join(onPath, 'patchwire'));
  assert.equal(findProgram('~/bin/patchwire', { PATH: onPath }, home), inHome);
  assert.equal(findProgram('/nonexistent/patchwire', { PATH: onPath }, home), null);
  fs.writeFileSync(path.join(onPath, 'notexec'), '');
  assert.equal(findProgram(path.join(onPath, 'notexec'), {}, home), null);
  assert.equal(findProgram('', { PATH: '' }, path.join(dir, 'nohome')), null);
});

test('the project folder holds the .patchwire.toml in or above the first candidate that has one', () => {
  const dir = fs.mkdtempSync(path.join(TMP, 'proj-'));
  fs.mkdirSync(path.join(dir, 'a', 'sub'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'b'));
  assert.equal(projectFolder([path.join(dir, 'b')]), null);
  fs.writeFileSync(path.join(dir, 'a', '.patchwire.toml'), '');
  // a package folder opened on its own: the project (and its paths) start at the config's folder
  assert.equal(projectFolder([path.join(dir, 'b'), path.join(dir, 'a', 'sub')]), path.join(dir, 'a'));
});

test('ask streams each event as it arrives, the prompt on stdin, never applying', async () => {
  const { cli, calls, dir } = scenario({ ask: { stdout: [...fx.ASK_EVENTS, fx.OUTCOME], stderr: 'synced 3 of 3 file(s)\n' } });
  const seen = [];
  const run = await cli.ask('add a flag\n-- and more', { onEvent: (e) => seen.push(e.type) }).done;
  assert.equal(run.code, 0);
  assert.deepEqual(seen, [...fx.ASK_EVENTS.map((e) => e.type), 'outcome']);
  assert.ok(logged.includes('synced 3 of 3 file(s)'));
  const [call] = calls();
  assert.deepEqual(call.argv, ['ask', '-', '--no-apply', '--json']);
  assert.equal(call.stdin, 'add a flag\n-- and more');
  assert.equal(call.cwd, fs.realpathSync(dir));
  await cli.ask('more', { on: 'aaa111' }).done;
  assert.deepEqual(calls()[1].argv, ['ask', '-', '--no-apply', '--on', 'aaa111', '--json']);
});

test('each command is the CLI command with --json; apply always passes --yes', async () => {
  const { cli, calls } = scenario({ apply: { stdout: [fx.APPLIED] }, undo: { stdout: [{ restored: ['a'] }] }, jobs: { stdout: [fx.JOBS] } });
  assert.deepEqual(await cli.apply('j1'), fx.APPLIED);
  await cli.apply('j1', ['src/app.py', 'we*ird'], { keepConflicts: true });
  assert.deepEqual(await cli.undo(), { restored: ['a'] });
  assert.deepEqual((await cli.jobs()).jobs.length, 4);
  assert.deepEqual(calls().map((c) => c.argv), [
    ['apply', 'j1', '--yes', '--json'],
    ['apply', '--json', '--yes', '--keep-conflicts', 'j1', '--', 'src/app.py', 'we*ird'],
    ['apply', '--undo', '--yes', '--json'],
    ['jobs', '--json'],
  ]);
});

test('a refusal is a CliError in the CLI\'s words', async () => {
  const { cli } = scenario({ apply: { stdout: [fx.error('the patch does not apply to the files here; nothing was changed:\nsrc/app.py: patch does not apply', 5, 'ask again')], code: 5 } });
  await assert.rejects(cli.apply('j1'), (e) => e instanceof CliError && e.exitStatus === 5 && e.hint === 'ask again'
    && e.message.startsWith('the patch does not apply'));
});

test('doctor\'s failing checks are a result, not an error', async () => {
  const checks = [{ name: 'git', ok: true, detail: 'git 2.39' }, { name: 'agent', ok: false, detail: 'cannot reach', fix: 'start it' }];
  const { cli } = scenario({ doctor: { stdout: [{ ok: false, checks }], code: 1 } });
  assert.deepEqual((await cli.doctor()).checks, checks);
});

test('a program that is missing or not patchwire is a clear error', async () => {
  await assert.rejects(new Cli({ program: null, cwd: '/' }).jobs(), (e) => e.notFound && /not found/.test(e.message));
  await assert.rejects(new Cli({ program: '/nonexistent/patchwire', cwd: '/' }).jobs(), (e) => e.notFound && /ENOENT/.test(e.message));
  const { cli } = scenario({ jobs: { stdout: [], stderr: 'usage: something else\n', code: 0 } });
  await assert.rejects(cli.jobs(), /printed no JSON/);
});

test('interrupting an ask before its job exists stops the CLI as Ctrl-C does', async () => {
  const { cli, calls } = scenario({ ask: { stdout: [], hold: true } });
  const proc = cli.ask('x');
  for (let i = 0; i < 500 && !calls().length; i++) {
    await new Promise((r) => setTimeout(r, 10));
  }
  proc.interrupt();
  const run = await proc.done;
  assert.equal(run.code, 130);
  assert.equal(errorFrom(run).message, 'interrupted');
});
