'use strict';
// A stand-in for the `vscode` module (only the extension host has the real one): widgets
// answer from a script of answers and every call is recorded. `install()` makes
// require('vscode') return it. The end-to-end test (tests/test_vscode_e2e.py) runs the
// extension in a real VS Code.

const Module = require('module');
const path = require('path');

class Uri {
  constructor({ scheme = 'file', path: p = '', query = '' }) {
    Object.assign(this, { scheme, path: p, query });
  }

  static file(p) { return new Uri({ scheme: 'file', path: p }); }

  static from(parts) { return new Uri(parts); }

  get fsPath() { return this.path; }

  toString() { return `${this.scheme}:${this.path}${this.query ? '?' + this.query : ''}`; }
}

function emitter() {
  const listeners = [];
  return { event: (fn) => { listeners.push(fn); return { dispose() {} }; }, fire: (v) => listeners.forEach((fn) => fn(v)) };
}

function createStub() {
  const stub = {
    calls: [],
    answers: [], // consumed in order by the widgets that wait for the user
    output: [],
    settings: { path: '', statusRefreshSeconds: 0 },
    folders: [],
    documents: [],
    commands: new Map(),
  };
  const record = (name, args) => stub.calls.push({ name, args });
  const answer = (name, args) => {
    record(name, args);
    if (!stub.answers.length) {
      throw new Error(`no scripted answer for ${name}: ${JSON.stringify(args[0])}`);
    }
    const next = stub.answers.shift();
    return Promise.resolve(typeof next === 'function' ? next(...args) : next);
  };
  const message = (name) => (text, ...items) => {
    record(name, [text, ...items]);
    const wants = items.filter((i) => typeof i === 'string');
    return Promise.resolve(wants.length && stub.answers.length && typeof stub.answers[0] === 'string'
      && wants.includes(stub.answers[0]) ? stub.answers.shift() : undefined);
  };
  stub.vscode = {
    Uri,
    StatusBarAlignment: { Left: 1, Right: 2 },
    ProgressLocation: { Notification: 15 },
    QuickPickItemKind: { Separator: -1, Default: 0 },
    window: {
      activeTextEditor: undefined,
      createOutputChannel: (name) => ({
        name, appendLine: (l) => stub.output.push(l), show: () => record('output.show', []), dispose() {},
      }),
      createStatusBarItem: () => {
        stub.statusItem = { text: '', tooltip: '', show() { this.shown = true; }, dispose() {} };
        return stub.statusItem;
      },
      showInputBox: (...a) => answer('showInputBox', a),
      showQuickPick: (...a) => answer('showQuickPick', a),
      showInformationMessage: message('showInformationMessage'),
      showWarningMessage: message('showWarningMessage'),
      showErrorMessage: message('showErrorMessage'),
      withProgress: (options, task) => {
        record('withProgress', [options]);
        const cancel = emitter();
        const progress = { messages: [], report: (m) => { progress.messages.push(m.message); record('progress', [m.message]); } };
        stub.progress = { progress, options, cancel: () => cancel.fire() };
        return task(progress, { onCancellationRequested: cancel.event, isCancellationRequested: false });
      },
    },
    workspace: {
      get workspaceFolders() { return stub.folders.map((f) => ({ uri: Uri.file(f) })); },
      getWorkspaceFolder: (uri) => {
        const f = stub.folders.find((d) => uri.fsPath.startsWith(d + path.sep));
        return f ? { uri: Uri.file(f) } : undefined;
      },
      get textDocuments() { return stub.documents; },
      asRelativePath: (uri) => path.relative(stub.folders[0], uri.fsPath),
      getConfiguration: () => ({ get: (key) => stub.settings[key] }),
      saveAll: () => { record('saveAll', []); return Promise.resolve(true); },
      registerTextDocumentContentProvider: (scheme, provider) => { stub.provider = provider; return { dispose() {} }; },
      onDidChangeConfiguration: () => ({ dispose() {} }),
    },
    commands: {
      registerCommand: (name, fn) => { stub.commands.set(name, fn); return { dispose() {} }; },
      executeCommand: (name, ...args) => { record('executeCommand', [name, ...args]); return Promise.resolve(); },
    },
  };
  return stub;
}

/** require('vscode') returns `stub.vscode` from now on; modules under lib/ are loaded anew. */
function install(stub) {
  const original = Module._load;
  Module._load = function (request, parent, isMain) {
    return request === 'vscode' ? stub.vscode : original.call(this, request, parent, isMain);
  };
  for (const key of Object.keys(require.cache)) {
    if (key.includes(`${path.sep}lib${path.sep}`) || key.endsWith('extension.js')) {
      delete require.cache[key];
    }
  }
  return () => { Module._load = original; };
}

module.exports = { createStub, install, Uri };
