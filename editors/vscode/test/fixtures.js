'use strict';
// What the real CLI printed (patchwire 0.3, stand-in AI), trimmed; tests/test_vscode.py
// checks that the real CLI still prints the fields the extension reads.

const JOB = '7aa6964d0087';

const ASK_EVENTS = [
  { seq: 1, job: JOB, time: 1795501373.055, type: 'queued', project: 'laptop', position: 2 },
  { seq: 2, job: JOB, time: 1795501373.06, type: 'position', position: 1 },
  { seq: 3, job: JOB, time: 1795501373.072, type: 'started', slot: 0 },
  { seq: 4, job: JOB, time: 1795501373.102, type: 'session', session_id: '7311cd1f', model: 'stand-in' },
  { seq: 5, job: JOB, time: 1795501373.103, type: 'text', text: 'looking\nat two files' },
  { seq: 6, job: JOB, time: 1795501373.103, type: 'tool', name: 'Write', detail: 'src/app.py' },
  { seq: 7, job: JOB, time: 1795501373.104, type: 'tool', name: 'Write', detail: 'new.txt' },
  { seq: 8, job: JOB, time: 1795501373.105, type: 'result', subtype: 'success', is_error: false },
  { seq: 9, job: JOB, time: 1795501373.124, type: 'finished', status: 'done', stats: { files: 2, added: 2, removed: 1, binary: 0 } },
];
const OUTCOME = { type: 'outcome', job: JOB, applied: false, files: ['new.txt', 'src/app.py'] };

// The CLI's human progress on stderr (no colour: not a terminal), control characters and all.
const ASK_STDERR = 'synced 3 of 3 file(s), 236 B in 0.1s\n   0.0s queued as job 7aa6964d0087, 2 ahead\n   0.0s AI started\n'
  + '   0.0s looking \u001b]0;title\u0007\n   0.0s > Write src/app.py\n   0.1s AI finished: 2 file(s), +2 -1\n';

const DIFF = {
  job: JOB,
  files: [
    { path: 'new.txt', old_path: 'new.txt', kind: 'new', added: 1, removed: 0, binary: false },
    { path: 'src/app.py', old_path: 'src/app.py', kind: 'modified', added: 1, removed: 1, binary: false },
  ],
  patch: 'diff --git a/new.txt b/new.txt\n...',
  sha256: 'c0ffee'.padEnd(64, '0'), // of the patch bytes shown: Apply passes it back (apply --sha256)
};
// After issue 8 the CLI adds look_closely; the extension shows it when present.
const DIFF_LOOK_CLOSELY = {
  ...DIFF,
  files: [...DIFF.files, { path: 'run.sh', old_path: 'run.sh', kind: 'mode changed', added: 0, removed: 0, binary: false }],
  look_closely: [
    { path: 'run.sh', reason: 'becomes executable' },
    { path: '.vscode/tasks.json', reason: 'configures a tool' },
  ],
};

function job(id, status, created, extra = {}) {
  return { id, project: 'laptop', prompt: `prompt of ${id}\nsecond line`, status, reason: null, created, tree: 'abc', stats: {}, ...extra };
}

const JOBS = {
  jobs: [
    job('aaa111', 'done', 1000, { stats: { files: 2, added: 2, removed: 1 } }),
    job('bbb222', 'running', 3000),
    job('ccc333', 'queued', 2000),
    job('ddd444', 'failed', 500, { reason: 'the AI exited with status 1' }),
  ],
};

const APPLIED = { how: 'plain', files: ['new.txt', 'src/app.py'], conflicts: [], job: JOB, partial: false };

function error(message, exitStatus, hint = '', code = '') {
  return { error: message, hint, exit_status: exitStatus, ...(code ? { details: { error: message, code } } : {}) };
}

module.exports = { APPLIED, ASK_EVENTS, ASK_STDERR, DIFF, DIFF_LOOK_CLOSELY, JOB, JOBS, OUTCOME, error, job };
