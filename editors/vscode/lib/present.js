'use strict';
// What the user reads: the agent's events as output-channel lines and progress messages, jobs
// as quick-pick rows, the status bar text, the "look closely" flags. Pure functions (no
// `vscode`), so the unit tests check the exact words.

// Every string from the box (AI text, tool details, file names) is data: control characters
// are shown escaped, never passed on to the editor's widgets raw; so are the characters a
// reader cannot see (bidi marks and overrides, zero-width and format characters, line and
// paragraph separators, tag characters, invisible letters such as U+3164), as the CLI does.
// eslint-disable-next-line no-control-regex, no-misleading-character-class
// The variation selectors too (`allowed\ufe00` is another name than `allowed`, drawn the same),
// but FE0E/FE0F after an emoji-like symbol, where they pick its style.
const UNSAFE = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]|[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0d\ufeff\uffa0\ufff0-\ufffb\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u{110BD}\u{110CD}\u{13430}-\u{1343F}\u{1BCA0}-\u{1BCA3}\u{1D173}-\u{1D17A}\u{E0000}-\u{E0FFF}]|(?<![\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf\u23e9-\u23f3\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299\u{1F000}-\u{1FAFF}])[\ufe0e\ufe0f]/gu;

function clean(text) {
  return String(text === undefined || text === null ? '' : text).replace(UNSAFE, (c) => {
    const code = c.codePointAt(0);
    return code <= 0x9f ? '\\x' + code.toString(16).padStart(2, '0') : `<U+${code.toString(16).toUpperCase().padStart(4, '0')}>`;
  });
}

// VS Code draws [label](command:ID?ARGS "title") in a notification as a link that runs the
// command on a click, and $(name) in notifications, quick picks and the status bar as an
// icon. In text from the box both are broken up ("] (", "$ ("), so a failure reason, a file
// name or a job's status shows as the characters it is and runs nothing.
function plain(text) {
  return clean(text).replace(/\]\(/g, '] (').replace(/\$\(/g, '$ (');
}

function oneLine(text, max = 80) {
  const line = clean(text).split('\n').map((l) => l.trim()).filter(Boolean)[0] || '';
  return line.length > max ? line.slice(0, max - 1) + '…' : line;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** The line(s) an event adds to the "Patchwire" output channel; null for bookkeeping. */
function outputLines(event) {
  const e = event || {};
  switch (e.type) {
    case 'queued':
      return [`queued as job ${clean(e.job)}` + (e.position ? `, ${e.position} ahead` : '')];
    case 'position':
      return [`waiting: ${e.position} ahead in the queue`];
    case 'started':
      return ['AI started'];
    case 'text':
    case 'output': {
      const lines = clean(e.text).trim().split('\n');
      return lines[0] ? lines : null;
    }
    case 'tool':
      return [`> ${clean(e.name)} ${clean(e.detail || '')}`.trimEnd()];
    case 'tool_error':
      return [`  tool error: ${oneLine(e.text, 200)}`];
    case 'finished':
      return [finishedText(e), ...checksLine(e.checks), ...networkLine(e.network)];
    case 'failed':
      return [`AI run failed: ${clean(e.reason)}`, ...networkLine(e.network)];
    case 'setup':
    case 'check':
      return stepLine(e);
    case 'network':
      return [`network: ${clean(e.host)}`];
    case 'network_refused':
      return [`network: ${clean(e.host)} refused by the box's [network] policy (x${Number(e.count) || 1})`];
    case 'cancelled':
      return [`job cancelled: ${clean(e.reason || '')}`.trimEnd()];
    case 'outcome':
      return e.files && e.files.length ? [`changed: ${e.files.map(clean).join(', ')}`] : null;
    case 'unparsed':
      return [clean(e.text)];
    default:
      return null;
  }
}

/** A [box] setup command's or check's start, output line or end, as the CLI prints it. */
function stepLine(e) {
  const name = e.type === 'check' ? clean(e.name || '') : clean(e.command || '');
  if (e.step === 'start') {
    return [`${e.type}: ${name}`];
  }
  if (e.step === 'end') {
    return [`${e.type}: ${name} ` + (e.ok ? 'ok' : `FAILED, exit ${Number.isInteger(e.exit_code) ? e.exit_code : '?'}`)];
  }
  if (e.step === 'skipped') {
    return [`${e.type}: skipped (${clean(e.reason || '')})`];
  }
  return typeof e.text === 'string' ? [`  | ${oneLine(e.text, 500)}`] : null;
}

/** The job's checks, as the CLI shows them atop its preview: "checks: format ok, test FAILED";
 * `matches_patch` false (diff --json compared the receipt with the patch shown) says so. */
function checksLine(checks) {
  if (!checks || typeof checks !== 'object' || !Array.isArray(checks.runs)) {
    return [];
  }
  const parts = checks.runs.map((r) => `${clean(String(r && r.name))} ` +
    (r && r.timed_out ? 'TIMED OUT' : r && r.ok === true ? 'ok' : 'FAILED'));
  const other = checks.matches_patch === false ? ' (ran on ANOTHER patch than the one shown)' : '';
  return ['checks: ' + (parts.length ? parts.join(', ') : 'none ran') + other];
}

/** The job's egress summary, as the CLI prints it: "network contacted: a, b; refused: c x3". */
function networkLine(network) {
  if (!network || typeof network !== 'object') {
    return [];
  }
  const parts = [];
  const contacted = Object.keys(network.contacted || {});
  const refused = Object.entries(network.refused || {});
  if (contacted.length) {
    parts.push('contacted: ' + contacted.slice(0, 10).map(clean).join(', ') + (contacted.length > 10 ? ` and ${contacted.length - 10} more` : ''));
  }
  if (refused.length) {
    parts.push('refused: ' + refused.slice(0, 10).map(([h, n]) => `${clean(h)} x${Number(n) || 0}`).join(', ') +
      (refused.length > 10 ? ` and ${refused.length - 10} more` : ''));
  }
  return parts.length ? ['network ' + parts.join('; ')] : [];
}

function finishedText(e) {
  const stats = e.stats || {};
  if (!stats.files) {
    return 'AI finished: no changes';
  }
  return `AI finished: ${plural(stats.files, 'file')}, +${stats.added || 0} -${stats.removed || 0}`;
}

/** The progress notification's message after an event; null keeps the current one. A
 * notification draws links and icons: the message is plain(). */
function progressMessage(event) {
  const message = progressText(event);
  return message === null ? null : plain(message);
}

function progressText(event) {
  const e = event || {};
  switch (e.type) {
    case 'queued':
      return e.position ? `queued as job ${clean(e.job)}: ${e.position} ahead` : `queued as job ${clean(e.job)}`;
    case 'position':
      return `queued: ${e.position} ahead`;
    case 'started':
      return 'running';
    case 'tool':
      return `running: ${oneLine(`${e.name} ${e.detail || ''}`, 60)}`;
    case 'text':
      return oneLine(e.text) ? `running: ${oneLine(e.text, 60)}` : null;
    case 'finished':
      return 'fetching the diff';
    default:
      return null;
  }
}

const STATUS_ICONS = { queued: '$(clock)', running: '$(sync~spin)', done: '$(check)', failed: '$(error)', cancelled: '$(circle-slash)' };

function jobItem(job, now = Date.now() / 1000) {
  const stats = job.stats || {};
  const size = stats.files ? ` · ${plural(stats.files, 'file')} +${stats.added || 0} -${stats.removed || 0}` : '';
  return {
    label: `${STATUS_ICONS[job.status] || ''} ${plain(oneLine(job.prompt, 70)) || '(no prompt)'}`.trim(),
    description: `${plain(job.id)} · ${plain(job.status)} · ${age(now - job.created)} ago${size}`,
    detail: job.reason ? plain(oneLine(job.reason, 120)) : undefined,
    job,
  };
}

function age(seconds) {
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['m', 60]]) {
    if (seconds >= size) {
      return `${Math.floor(seconds / size)}${unit}`;
    }
  }
  return `${Math.max(0, Math.floor(seconds))}s`;
}

/** Newest first. */
function sortJobs(jobs) {
  return [...jobs].sort((a, b) => (b.created || 0) - (a.created || 0));
}

/** The status bar: the agent's health and how many of your jobs run or wait. */
/** A detached job's end, for a notification: box text made plain. */
function endedMessage(job) {
  const stats = job.stats || {};
  if (job.status === 'done') {
    return `Patchwire: job ${plain(job.id)} is done: ${plural(stats.files || 0, 'file')} changed`;
  }
  return `Patchwire: job ${plain(job.id)} ${plain(job.status)}${job.reason ? ': ' + plain(oneLine(job.reason, 200)) : ''}`;
}

function statusBar(jobs, error) {
  if (error) {
    return {
      text: '$(warning) Patchwire',
      tooltip: `Patchwire: ${clean(error.message)}${error.hint ? '\n' + clean(error.hint) : ''}\nClick to show jobs.`,
    };
  }
  const running = jobs.filter((j) => j.status === 'running').length;
  const waiting = jobs.filter((j) => j.status === 'queued').length;
  const parts = [running && `${running} running`, waiting && `${waiting} waiting`].filter(Boolean);
  return {
    text: (running ? '$(sync~spin)' : '$(cloud)') + ' Patchwire' + (parts.length ? ': ' + parts.join(', ') : ''),
    tooltip: `Patchwire: the agent answers; ${parts.length ? parts.join(', ') : 'none of your jobs runs or waits'}.\nClick to show jobs.`,
  };
}

/** The review's file rows; `look_closely` ({path, reason}) may be absent (older CLI). */
function fileItems(diff) {
  const flags = new Map();
  for (const item of diff.look_closely || []) {
    flags.set(item.path, [...(flags.get(item.path) || []), plain(item.reason)]);
  }
  return (diff.files || []).map((f) => {
    const reasons = flags.get(f.path) || [];
    const size = f.binary ? 'binary' : `+${f.added} -${f.removed}`;
    return {
      label: `${reasons.length ? '$(warning)' : '$(diff)'} ${plain(f.path)}`,
      description: `${plain(f.kind)} ${size}` + (f.old_path && f.old_path !== f.path ? ` (from ${plain(f.old_path)})` : ''),
      detail: reasons.length ? `look closely: ${reasons.join('; ')}` : undefined,
      path: f.path,
      file: f,
    };
  });
}

/** look_closely items naming no file of the patch (a mass deletion, say) still get shown. */
function generalFlags(diff) {
  const paths = new Set((diff.files || []).map((f) => f.path));
  return (diff.look_closely || []).filter((i) => !paths.has(i.path)).map((i) => `${plain(i.path)}: ${plain(i.reason)}`);
}

/** The prompt with the chosen context: the selection's text, or the current file's path (the
 * file itself is synced with the project, so its name is enough). */
function promptWithContext(prompt, context) {
  if (!context) {
    return prompt;
  }
  if (context.kind === 'file') {
    return `${prompt}\n\nContext: the file ${context.path}`;
  }
  const fence = context.text.includes('```') ? '~~~~' : '```';
  return `${prompt}\n\nContext: lines ${context.startLine}-${context.endLine} of ${context.path}:\n${fence}\n${context.text}\n${fence}`;
}

/** The notification after an apply. */
function appliedMessage(job, result) {
  const how = result.how === '3-way' ? ' (3-way merged with your edits)' : '';
  let text = `Patchwire: applied job ${plain(job)}${how}: ${plural(result.files.length, 'file')}`;
  if (result.partial) {
    text += '; the rest stays in the job';
  }
  return text;
}

function errorMessage(err) {
  return `Patchwire: ${plain(err.message)}` + (err.hint ? ` (${plain(err.hint)})` : '');
}

module.exports = {
  appliedMessage, checksLine, clean, endedMessage, errorMessage, fileItems, generalFlags, jobItem, networkLine, oneLine, outputLines, plain, plural,
  progressMessage, promptWithContext, sortJobs, statusBar,
};
