'use strict';
// The extension's commands: each is a short flow of VS Code widgets around one or two CLI
// calls. `Patchwire` holds what the flows share (the output channel, the status bar, the CLI
// for the current project); the unit tests build it with the `vscode` module stubbed.

const path = require('path');
const vscode = require('vscode');
const { Cli, CliError, errorFrom, findProgram, projectFolder } = require('./cli');
const present = require('./present');

const SCHEME = 'patchwire-job';

class Patchwire {
  constructor(context) {
    this.context = context;
    this.output = vscode.window.createOutputChannel('Patchwire');
    this.status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left, 10);
    this.status.command = 'patchwire.showJobs';
    this.status.name = 'Patchwire';
    this.contents = new JobContents(this);
    this.timer = null;
    this.detached = new Set(); // jobs asked detached: the status bar's refresh tells when each ends
  }

  // --- the CLI for the current project

  /** The CLI, run in the project folder; throws a CliError naming what is missing. Its
   * progress lines (stderr) go to the output channel, unless `quiet`. */
  cli({ quiet = false } = {}) {
    const folders = [];
    const active = vscode.window.activeTextEditor;
    const own = active && vscode.workspace.getWorkspaceFolder(active.document.uri);
    if (own) {
      folders.push(own.uri.fsPath);
    }
    for (const f of vscode.workspace.workspaceFolders || []) {
      folders.push(f.uri.fsPath);
    }
    const root = projectFolder(folders);
    if (!root) {
      throw new CliError('no .patchwire.toml in this workspace',
        { hint: 'run `patchwire init` in the project folder, then reopen it' });
    }
    const setting = vscode.workspace.getConfiguration('patchwire').get('path');
    const log = quiet ? () => {} : (line) => this.output.appendLine(present.clean(line));
    return new Cli({ program: findProgram(setting), cwd: root, log });
  }

  log(line) {
    this.output.appendLine(line);
  }

  /** An expected failure in the CLI's own words, with the way out as a button. */
  async showError(err) {
    if (!(err instanceof CliError)) {
      this.log(`internal error: ${err && err.stack ? err.stack : err}`);
    }
    const untrusted = err instanceof CliError && err.code === 'untrusted';
    const actions = err instanceof CliError && err.notFound ? ['Open Settings']
      : untrusted ? ['Review and Trust...', 'Show Output'] : ['Show Output'];
    const pick = await vscode.window.showErrorMessage(present.errorMessage(err), ...actions);
    if (pick === 'Review and Trust...') {
      await this.guard(this.trust)();
    } else if (pick === 'Open Settings') {
      await vscode.commands.executeCommand('workbench.action.openSettings', 'patchwire.path');
    } else if (pick === 'Show Output') {
      this.output.show(true);
    }
  }

  /** Run a command's flow; any failure is shown, never thrown at VS Code. */
  guard(flow) {
    return async (...args) => {
      try {
        return await flow.apply(this, args);
      } catch (err) {
        this.showError(err); // not awaited: the message stays until the user closes it
        return undefined;
      } finally {
        this.refreshStatus();
      }
    };
  }

  // --- status bar

  startStatus() {
    const seconds = vscode.workspace.getConfiguration('patchwire').get('statusRefreshSeconds');
    this.stopStatus();
    if (seconds > 0) {
      this.timer = setInterval(() => this.refreshStatus(), seconds * 1000);
    }
    return this.refreshStatus();
  }

  stopStatus() {
    if (this.timer) {
      clearInterval(this.timer);
      this.timer = null;
    }
  }

  async refreshStatus() {
    let jobs = [];
    let error = null;
    try {
      jobs = (await this.cli({ quiet: true }).jobs()).jobs || [];
    } catch (err) {
      error = err;
    }
    Object.assign(this.status, present.statusBar(jobs, error));
    this.status.show();
    this.tellEnded(jobs);
    return { jobs, error };
  }

  /** A detached job of this window that has ended: one notification, with Review when done. */
  tellEnded(jobs) {
    for (const job of jobs) {
      if (!this.detached.has(job.id) || !['done', 'failed', 'cancelled'].includes(job.status)) {
        continue;
      }
      this.detached.delete(job.id);
      const text = present.endedMessage(job);
      if (job.status !== 'done') {
        vscode.window.showWarningMessage(text);
        continue;
      }
      vscode.window.showInformationMessage(text, 'Review').then(
        (pick) => (pick === 'Review' ? this.guard(() => this.review(job.id))() : undefined));
    }
  }

  // --- picking a job

  /** A quick pick of this project's jobs (newest first) that pass `filter`; undefined on
   * Escape. Another project's jobs are not offered: their change is not for these files. */
  async pickJob(placeHolder, filter = () => true, none = 'no jobs yet') {
    const listed = await this.cli().jobs();
    const mine = (listed.jobs || []).filter((j) => !listed.project || j.project === listed.project);
    const jobs = present.sortJobs(mine.filter(filter));
    if (!jobs.length) {
      vscode.window.showInformationMessage(`Patchwire: ${none}`);
      return undefined;
    }
    const pick = await vscode.window.showQuickPick(jobs.map((j) => present.jobItem(j)),
      { placeHolder, matchOnDescription: true, ignoreFocusOut: true });
    return pick && pick.job;
  }

  // --- Ask, Ask Follow-up

  /** Ask (or, with `followUp`, continue a finished job: `on`, or one picked). */
  async ask(followUp = false, on = null) {
    const cli = this.cli();
    if (followUp && !on) {
      const parent = await this.pickJob('The job to follow up on', (j) => j.status === 'done', 'no finished job to follow up on');
      if (!parent) {
        return undefined;
      }
      on = parent.id;
    }
    const text = await vscode.window.showInputBox({
      title: on ? `Patchwire: follow up on job ${on}` : 'Patchwire: Ask',
      prompt: 'What should the AI do? It works on the box; you review its diff here.',
      placeHolder: 'e.g. add a --verbose flag to the CLI', ignoreFocusOut: true,
    });
    if (!text || !text.trim()) {
      return undefined;
    }
    const context = await this.pickContext(cli.cwd);
    if (context === undefined) {
      return undefined;
    }
    if (!(await this.saveFirst())) {
      return undefined;
    }
    const run = await this.runAsk(cli, present.promptWithContext(text, context), on);
    if (run.cancelled || !run.job) {
      return run;
    }
    if (!run.files.length) {
      vscode.window.showInformationMessage(`Patchwire: the AI made no changes (job ${present.plain(run.job)})`);
      return run;
    }
    run.review = await this.review(run.job);
    return run;
  }

  /** Ask, and let the box work: the job is queued and the window is free; a notification says
   * when it ends (found by the status bar's refresh), with Review to see its change. */
  async askDetached() {
    const cli = this.cli();
    const text = await vscode.window.showInputBox({
      title: 'Patchwire: Ask (detached)',
      prompt: 'What should the AI do? It works on the box; you are told when it is done.',
      placeHolder: 'e.g. upgrade the dependencies and fix what breaks', ignoreFocusOut: true,
    });
    if (!text || !text.trim()) {
      return undefined;
    }
    const context = await this.pickContext(cli.cwd);
    if (context === undefined || !(await this.saveFirst())) {
      return undefined;
    }
    this.log(`--- ${new Date().toLocaleTimeString()} ask (detached): ${present.oneLine(text)}`);
    const result = await cli.askDetached(present.promptWithContext(text, context));
    this.detached.add(result.job);
    vscode.window.showInformationMessage(`Patchwire: job ${present.plain(result.job)} is queued on the box; `
      + 'you will be told when it ends');
    return result;
  }

  /** null: no context; undefined: the user backed out. Asked only when there is an editor
   * on a file of the project (`root`): the path the AI is told is relative to the project. */
  async pickContext(root) {
    const editor = vscode.window.activeTextEditor;
    if (!editor || editor.document.uri.scheme !== 'file') {
      return null;
    }
    const rel = path.relative(root, editor.document.uri.fsPath).split(path.sep).join('/');
    if (!rel || rel.startsWith('../') || rel === '..' || path.isAbsolute(rel)) {
      return null;
    }
    const items = [{ label: 'No context', context: null }];
    const sel = editor.selection;
    if (sel && !sel.isEmpty) {
      items.push({
        label: `Add the selection (lines ${sel.start.line + 1}-${sel.end.line + 1} of ${rel})`,
        context: { kind: 'selection', path: rel, startLine: sel.start.line + 1, endLine: sel.end.line + 1, text: editor.document.getText(sel) },
      });
    }
    items.push({ label: `Add the current file (${rel})`, context: { kind: 'file', path: rel } });
    const pick = await vscode.window.showQuickPick(items, { placeHolder: 'Context for the prompt', ignoreFocusOut: true });
    return pick ? pick.context : undefined;
  }

  /** The AI sees the files on disk: unsaved edits are saved first, or the user backs out. */
  async saveFirst() {
    const dirty = vscode.workspace.textDocuments.filter((d) => d.isDirty && d.uri.scheme === 'file');
    if (!dirty.length) {
      return true;
    }
    const names = dirty.map((d) => vscode.workspace.asRelativePath(d.uri, false)).join(', ');
    const pick = await vscode.window.showWarningMessage(
      `Patchwire sends the saved files; unsaved changes in ${names} would not go.`, 'Save All and Ask', 'Ask Anyway');
    if (pick === 'Save All and Ask') {
      return vscode.workspace.saveAll(false);
    }
    return pick === 'Ask Anyway';
  }

  /** Sync, ask and stream, under a cancellable progress notification. Cancelling cancels the
   * job on the box (before the job exists: stops the CLI, as Ctrl-C would). */
  runAsk(cli, prompt, on) {
    this.log(`--- ${new Date().toLocaleTimeString()} ask${on ? ` (follow-up on ${on})` : ''}: ${present.oneLine(prompt)}`);
    this.output.show(true);
    const title = on ? `Patchwire: follow-up on ${on}` : 'Patchwire';
    return vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title, cancellable: true },
      (progress, token) => followAsk(this, cli, prompt, on, progress, token));
  }

  // --- review and apply

  /** The job's change as a multi-file diff, then a quick pick: Apply / Apply selected files /
   * Keep for later, with the files (opening one shows its diff) and the look-closely flags.
   * An attempt of several (`attempt`: its number) also offers "apply one file from attempt K". */
  async review(job, { attempt = null } = {}) {
    const cli = this.cli();
    const diff = await cli.diff(job);
    const files = present.fileItems(diff);
    if (!files.length) {
      vscode.window.showInformationMessage(`Patchwire: job ${present.plain(job)} made no changes`);
      return 'empty';
    }
    await this.openChanges(cli.cwd, job, files);
    const general = present.generalFlags(diff);
    for (;;) {
      const action = await vscode.window.showQuickPick(reviewItems(files, general, diff.network, diff.checks, attempt), {
        title: `Patchwire: ${attempt ? `attempt ${attempt}, ` : ''}job ${job}, ${present.plural(files.length, 'file')}`,
        placeHolder: 'Apply the change here? Pick a file to see its diff.', ignoreFocusOut: true,
      });
      if (action && action.file) {
        await this.openDiff(cli.cwd, job, action);
        continue;
      }
      if (!action || action.action === 'keep') {
        vscode.window.showInformationMessage(`Patchwire: kept job ${present.plain(job)}; apply it later with "Patchwire: Apply Job"`);
        return 'kept';
      }
      let paths = [];
      if (action.action === 'some') {
        const chosen = await vscode.window.showQuickPick(files.map((f) => ({ ...f, picked: true })), {
          title: `Patchwire: the files of job ${job} to apply`, canPickMany: true, ignoreFocusOut: true,
        });
        if (!chosen || !chosen.length) {
          continue;
        }
        paths = chosen.length === files.length ? [] : chosen.map((f) => f.path);
      }
      if (action.action === 'one') {
        const one = await vscode.window.showQuickPick(files, {
          title: `Patchwire: the file to apply from attempt ${attempt} (job ${job})`,
          placeHolder: 'The other files stay in the job', ignoreFocusOut: true,
        });
        if (!one) {
          continue;
        }
        paths = files.length === 1 ? [] : [one.path];
      }
      return this.apply(cli, job, paths, files, diff.sha256);
    }
  }

  async openChanges(root, job, files) {
    const resources = files.map((f) => [vscode.Uri.file(path.join(root, f.path)),
      jobUri(job, f.file.old_path || f.path, 'old'), jobUri(job, f.path, 'new')]);
    try {
      await vscode.commands.executeCommand('vscode.changes', `Patchwire: job ${job}`, resources);
    } catch (err) {
      // VS Code before the multi-file diff editor: the first file's diff.
      await this.openDiff(root, job, files[0]);
    }
  }

  openDiff(root, job, item) {
    return vscode.commands.executeCommand('vscode.diff', jobUri(job, item.file.old_path || item.path, 'old'),
      jobUri(job, item.path, 'new'), `${item.path} (synced ↔ job ${job})`, { preview: true });
  }

  /** `patchwire apply JOB --yes --sha256 HEX [--only ...]` (the reviewed bytes only); a refusal
   * shows the CLI's own message. Two refusals have one button that retries (retryFor): where
   * the AI's edits overlap yours, with conflict markers; where files of yours the box never
   * had are in the way of a new file or a rename, replacing them. */
  async apply(cli, job, paths, files, sha256 = '') {
    // a file the change writes, or moves away (a rename's old name): an unsaved buffer of
    // either would be left behind, its edits no longer on disk
    const chosen = paths.length ? files.filter((f) => paths.includes(f.path)) : files;
    const names = [...paths, ...chosen.flatMap((f) => [f.path, f.file && f.file.old_path])].filter(Boolean);
    const touched = new Set(names.map((p) => path.join(cli.cwd, p)));
    const unsaved = vscode.workspace.textDocuments.filter((d) => d.isDirty && touched.has(d.uri.fsPath));
    if (unsaved.length) {
      const shown = unsaved.map((d) => present.plain(path.relative(cli.cwd, d.uri.fsPath).split(path.sep).join('/')));
      throw new CliError(`unsaved changes in ${shown.join(', ')}`,
        { hint: 'save or revert them, then apply the job again' });
    }
    let result;
    try {
      result = await cli.apply(job, paths, { sha256 });
    } catch (err) {
      const retry = retryFor(err);
      if (!retry) {
        throw err;
      }
      const pick = await vscode.window.showWarningMessage(retry.message, retry.button);
      if (pick !== retry.button) {
        return 'refused';
      }
      result = await cli.apply(job, paths, { ...retry.options, sha256 });
    }
    this.log(`applied job ${present.clean(job)} (${present.clean(result.how)}): ${result.files.map(present.clean).join(', ')}`);
    vscode.window.showInformationMessage(present.appliedMessage(job, result));
    if (result.conflicts && result.conflicts.length) {
      vscode.window.showWarningMessage(`Patchwire: conflict markers to resolve in ${result.conflicts.map(present.plain).join(', ')}`);
    }
    return 'applied';
  }

  async applyJob() {
    const job = await this.pickJob('The job to review and apply', (j) => j.status === 'done', 'no finished job to apply');
    return job ? this.review(job.id) : undefined;
  }

  async undo() {
    const pick = await vscode.window.showWarningMessage(
      'Patchwire: restore the files the last apply changed to what they were before?', { modal: true }, 'Undo Apply');
    if (pick !== 'Undo Apply') {
      return undefined;
    }
    const result = await this.cli().undo();
    vscode.window.showInformationMessage(`Patchwire: restored ${present.plural(result.restored.length, 'file')}`);
    return result;
  }

  async cancel() {
    const job = await this.pickJob('The job to cancel', (j) => j.status === 'queued' || j.status === 'running', 'none of your jobs is queued or running');
    if (!job) {
      return undefined;
    }
    const result = await this.cli().cancel(job.id);
    vscode.window.showInformationMessage(`Patchwire: job ${present.plain(job.id)} is ${present.plain(result.job.status)}`);
    return result;
  }

  /** Your jobs; picking one offers what fits its state. */
  async showJobs() {
    const job = await this.pickJob('Your jobs on the agent box (newest first)');
    if (!job) {
      return undefined;
    }
    const actions = job.status === 'done' ? ['Review and Apply', 'Ask Follow-up', 'Show Events']
      : ['queued', 'running'].includes(job.status) ? ['Cancel Job', 'Show Events'] : ['Show Events'];
    const pick = await vscode.window.showQuickPick(actions, { placeHolder: `Job ${present.plain(job.id)}: ${present.plain(present.oneLine(job.prompt, 60))}` });
    if (pick === 'Review and Apply') {
      return this.review(job.id);
    }
    if (pick === 'Cancel Job') {
      const result = await this.cli().cancel(job.id);
      vscode.window.showInformationMessage(`Patchwire: job ${present.plain(job.id)} is ${present.plain(result.job.status)}`);
      return result;
    }
    if (pick === 'Ask Follow-up') {
      return this.ask(true, job.id);
    }
    if (pick === 'Show Events') {
      const shown = await this.cli().show(job.id);
      this.log(`--- job ${present.clean(job.id)} (${present.clean(shown.job.status)}): ${present.oneLine(shown.job.prompt)}`);
      for (const event of shown.events || []) {
        (present.outputLines(event) || []).forEach((l) => this.log(l));
      }
      this.output.show(true);
    }
    return pick;
  }

  /** The project's .patchwire.toml names where the token and the files go and which programs
   * run, and a cloned repository can ship one: the CLI uses it only once trusted. Its settings
   * are shown in a modal first, and what is trusted is what was shown (`trust --sha256`). */
  async trust() {
    const cli = this.cli();
    const shown = await cli.trustShow();
    const settings = Object.entries(shown.settings || {}).map(([k, v]) => `${present.plain(k)} = ${present.plain(JSON.stringify(v))}`);
    const pick = await vscode.window.showWarningMessage(
      `Patchwire: trust ${present.plain(shown.config)}?`,
      { modal: true, detail: 'It says where your token and your files go and which programs run. '
        + `Trust it only if these are yours:\n\n${settings.join('\n')}` },
      'Trust');
    if (pick !== 'Trust') {
      return null;
    }
    const result = await cli.trust(shown.sha256);
    vscode.window.showInformationMessage(`Patchwire: trusted ${present.plain(result.config)}`);
    return result;
  }

  async doctor() {
    const result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'Patchwire: checking every link' },
      () => this.cli().doctor());
    this.log('--- doctor');
    for (const c of result.checks) {
      this.log(`${c.ok ? 'ok  ' : 'FAIL'} ${present.clean(c.name)}: ${present.clean(c.detail)}`);
      if (!c.ok && c.fix) {
        this.log(`     fix: ${present.clean(c.fix)}`);
      }
    }
    const failed = result.checks.filter((c) => !c.ok);
    if (failed.length) {
      this.output.show(true);
      vscode.window.showErrorMessage(`Patchwire doctor: ${failed.map((c) => `${present.plain(c.name)}: ${present.plain(c.detail)}`).join('; ')}`);
    } else {
      vscode.window.showInformationMessage(`Patchwire doctor: all ${result.checks.length} checks passed`);
    }
    return result;
  }

  // --- several attempts

  /** Ask with N attempts, then a quick pick of the attempts with their figures; picking one
   * opens its review (its multi-file diff; apply all of it, only the files chosen, or "one
   * file from attempt K"). Back from a review kept for later, the attempts are offered again. */
  async askAttempts() {
    const cli = this.cli();
    const text = await vscode.window.showInputBox({
      title: 'Patchwire: Ask with Several Attempts', prompt: 'What should the AI do? Each attempt works on the same files.',
      ignoreFocusOut: true,
    });
    if (!text || !text.trim()) {
      return undefined;
    }
    const count = await vscode.window.showQuickPick(['2', '3', '4'].map((n) => ({ label: `${n} attempts`, n })),
      { placeHolder: 'How many attempts, side by side?', ignoreFocusOut: true });
    if (!count || !(await this.saveFirst())) {
      return undefined;
    }
    this.log(`--- ${new Date().toLocaleTimeString()} ask, ${count.n} attempts: ${present.oneLine(text)}`);
    const run = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: `Patchwire: ${count.n} attempts`, cancellable: true },
      (progress, token) => followAttempts(this, cli, text, Number(count.n), progress, token));
    if (run.cancelled || !run.outcome) {
      return run;
    }
    for (;;) {
      const chosen = await vscode.window.showQuickPick(attemptItems(run.outcome), {
        title: `Patchwire: ask ${present.plain(run.outcome.ask)}`, placeHolder: 'The attempt to review and apply', ignoreFocusOut: true,
      });
      if (!chosen || !chosen.job) {
        return run;
      }
      run.review = await this.review(chosen.job, { attempt: chosen.attempt });
      if (run.review !== 'kept') {
        return run;
      }
    }
  }
}

/** Cancel `job` on the box; its new status, or why not, goes to the output channel. */
function cancelJob(pw, cli, job) {
  return cli.cancel(job).then((r) => pw.log(`job ${job} is ${present.plain(r.job.status)}`),
    (err) => pw.log(`could not cancel job ${job}: ${present.clean(err.message)}`));
}

/** Follow `patchwire ask -n N` to its end; resolves to {jobs, outcome, cancelled}. Cancelling
 * cancels every attempt the box has named (before it named one: stops the CLI). */
async function followAttempts(pw, cli, prompt, attempts, progress, token) {
  const state = { jobs: [], ended: 0, outcome: null, cancelled: false };
  progress.report({ message: 'syncing the project' });
  const proc = cli.askAttempts(prompt, attempts, {
    onEvent: (event) => {
      if (event.type === 'queued' && !state.jobs.includes(event.job)) {
        state.jobs.push(event.job);
      }
      if (['finished', 'failed', 'cancelled'].includes(event.type)) {
        state.ended += 1;
        progress.report({ message: `${state.ended} of ${attempts} attempts ended` });
      }
      if (event.type === 'outcome') {
        state.outcome = event;
      }
    },
  });
  token.onCancellationRequested(() => {
    state.cancelled = true;
    if (!state.jobs.length) {
      proc.interrupt();
    }
    for (const job of state.jobs) {
      cancelJob(pw, cli, job);
    }
  });
  const run = await proc.done;
  if (state.cancelled) {  // stopped before the box's events named them: the CLI's error does
    const named = run.objects.filter((o) => typeof o.error === 'string' && o.details && Array.isArray(o.details.jobs))
      .flatMap((o) => o.details.jobs).filter((job) => typeof job === 'string' && !state.jobs.includes(job));
    await Promise.all(named.map((job) => cancelJob(pw, cli, job)));
  } else if (run.code !== 0) {
    throw errorFrom(run);
  }
  return state;
}

/** The attempts as quick-pick items: figures in the description, the differences and the
 * reason of a failed one in the detail; only a done attempt can be picked for review. */
function attemptItems(outcome) {
  return (outcome.attempts || []).map((a) => {
    const figures = a.status === 'done' ? `${present.plural(a.files, 'file')} +${a.added} -${a.removed}` : a.status;
    const cost = typeof a.cost_usd === 'number' ? ` · $${a.cost_usd.toFixed(4)}` : '';
    const took = typeof a.seconds === 'number' ? ` · ${a.seconds}s` : '';
    const differs = (outcome.differences || []).filter((d) => d.attempts[1] === a.attempt)
      .map((d) => `differs from ${d.attempts[0]} in ${present.plural(d.paths.length, 'file')}`);
    return {
      label: `${a.status === 'done' ? '$(git-compare)' : '$(error)'} Attempt ${a.attempt}${a.agent ? ` (${present.plain(a.agent)})` : ''}`,
      description: present.plain(figures + took + cost),
      detail: present.plain([...differs, a.problem || ''].filter(Boolean).join('; ')),
      job: a.status === 'done' && !a.problem ? a.job : null,
      attempt: a.attempt,
    };
  });
}

/** Follow one `patchwire ask` to its end; resolves to {job, end, files, cancelled}. */
async function followAsk(pw, cli, prompt, on, progress, token) {
  const state = { job: null, end: null, files: [], cancelled: false };
  const cancelOnBox = (job) => cancelJob(pw, cli, job);
  progress.report({ message: 'syncing the project' });
  const proc = cli.ask(prompt, {
    on,
    onEvent: (event) => {
      // The output channel gets the CLI's own progress lines (its stderr, via the Cli's log);
      // the events drive the notification.
      if (event.type === 'unparsed') {
        pw.log(present.clean(event.text));
      }
      const message = present.progressMessage(event);
      if (message) {
        progress.report({ message });
      }
      if (event.type === 'queued' || event.type === 'started') {
        pw.refreshStatus(); // the status bar counts this job as waiting, then running
      }
      if (event.type === 'queued' && !state.job) {
        state.job = event.job;
        if (state.cancelled) {
          cancelOnBox(state.job); // cancelled while syncing, and the ask got through
        }
      }
      if (['finished', 'failed', 'cancelled'].includes(event.type)) {
        state.end = event;
      }
      if (event.type === 'outcome') {
        state.files = event.files || [];
      }
    },
  });
  token.onCancellationRequested(() => {
    state.cancelled = true;
    pw.log('cancel requested');
    if (state.job) {
      cancelOnBox(state.job);
    } else {
      proc.interrupt();
    }
  });
  const run = await proc.done;
  if (state.cancelled) {
    vscode.window.showInformationMessage(state.job ? `Patchwire: job ${present.plain(state.job)} cancelled`
      : 'Patchwire: ask cancelled before it reached the box');
    return state;
  }
  if (run.code !== 0) {
    throw errorFrom(run);
  }
  return state;
}

/** The one-button retry a refused apply offers, or null: conflict markers where the AI's edits
 * overlap yours; replacing files the box never had (untracked, ignored) that stand where the
 * change puts a new file or a rename (the CLI's details.code "in_the_way"). */
function retryFor(err) {
  if (!(err instanceof CliError)) {
    return null;
  }
  if (err.code === 'in_the_way') {
    return {
      message: `Patchwire: ${present.plain(err.message)}. Overwrite replaces what is there; Undo Last Apply puts it back.`,
      button: 'Overwrite', options: { overwriteUntracked: true },
    };
  }
  if (/overlap/.test(err.message)) {
    return { message: present.errorMessage(err), button: 'Apply with Conflict Markers', options: { keepConflicts: true } };
  }
  return null;
}

function reviewItems(files, general, network, checks, attempt = null) {
  const flagged = files.filter((f) => f.detail).length;
  const warn = flagged || general.length ? ` (${flagged + general.length} to look closely at)` : '';
  // What the job reached on the network (the box's egress report), host names neutralised:
  // refused connections are worth a look before applying what the AI wrote after them.
  const refused = network && Object.keys(network.refused || {}).length;
  const egress = present.networkLine(network).map((line) => ({
    label: `$(${refused ? 'warning' : 'globe'}) ${present.plain(line)}`, action: 'keep',
    description: refused ? 'the box refused these' : 'what the job contacted',
  }));
  // The box's checks on this very patch (diff --json compared the receipt's sha256 with it).
  const verdict = present.checksLine(checks).map((line) => ({
    label: `$(${checks.passed ? 'pass' : 'error'}) ${present.plain(line)}`, action: 'keep',
    description: checks.passed ? 'run on the box, on this very patch' : 'a check failed: look before applying',
  }));
  return [
    ...verdict,
    { label: `$(check) Apply all ${present.plural(files.length, 'file')}`, action: 'all', description: warn },
    { label: '$(checklist) Apply selected files...', action: 'some' },
    ...(attempt ? [{ label: `$(file) Apply one file from attempt ${attempt}...`, action: 'one' }] : []),
    { label: '$(clock) Keep for later', action: 'keep' },
    ...general.map((g) => ({ label: `$(warning) ${g}`, action: 'keep', description: 'look closely' })),
    ...egress,
    { label: 'Files', kind: vscode.QuickPickItemKind.Separator },
    ...files,
  ];
}

function jobUri(job, file, side) {
  return vscode.Uri.from({ scheme: SCHEME, path: '/' + file, query: new URLSearchParams({ job, side }).toString() });
}

/** The read-only left and right sides of the diff editor: the file as synced and as the job
 * leaves it, each from `patchwire diff JOB --file PATH --side old|new`. */
class JobContents {
  constructor(pw) {
    this.pw = pw;
    this.cache = new Map();
  }

  async provideTextDocumentContent(uri) {
    const key = uri.toString();
    if (!this.cache.has(key)) {
      const query = new URLSearchParams(uri.query);
      // A job's files never change: each side is read once. A failure is shown, not kept.
      this.cache.set(key, this.pw.cli().file(query.get('job'), uri.path.slice(1), query.get('side'))
        .then(sideText, (err) => {
          this.cache.delete(key);
          return `(Patchwire could not read this file: ${present.clean(err.message)})`;
        }));
    }
    return this.cache.get(key);
  }
}

/** A side of the diff editor. Text that is not UTF-8 is shown byte by byte (Latin-1, under a
 * line saying so), never hidden: a change to it shows, whatever bytes it changes. */
function sideText(file) {
  if (!file.exists) {
    return '';
  }
  if (file.binary) {
    return `(binary file, not shown; mode ${file.mode})`;
  }
  if (file.base64 !== undefined) {
    return `(not UTF-8: each byte shown as a Latin-1 character)\n${Buffer.from(file.base64, 'base64').toString('latin1')}`;
  }
  return file.text;
}

module.exports = { Patchwire, JobContents, SCHEME, attemptItems, followAsk, jobUri, reviewItems, sideText };
