'use strict';
// Patchwire for VS Code: ask the AI on the agent box, watch it work, review its diff and apply
// it, all through the `patchwire` CLI's --json interface (lib/cli.js). The agent, the project
// and the token stay where the CLI keeps them (.patchwire.toml, the token file).

const vscode = require('vscode');
const { Patchwire, SCHEME } = require('./lib/commands');

const COMMANDS = {
  'patchwire.ask': (pw) => pw.ask(false),
  'patchwire.askDetached': (pw) => pw.askDetached(),
  'patchwire.askFollowUp': (pw) => pw.ask(true),
  'patchwire.askAttempts': (pw) => pw.askAttempts(),
  'patchwire.showJobs': (pw) => pw.showJobs(),
  'patchwire.applyJob': (pw) => pw.applyJob(),
  'patchwire.undoApply': (pw) => pw.undo(),
  'patchwire.cancelJob': (pw) => pw.cancel(),
  'patchwire.doctor': (pw) => pw.doctor(),
  'patchwire.trust': (pw) => pw.trust(),
};

function activate(context) {
  const pw = new Patchwire(context);
  context.subscriptions.push(pw.output, pw.status, { dispose: () => pw.stopStatus() });
  context.subscriptions.push(vscode.workspace.registerTextDocumentContentProvider(SCHEME, pw.contents));
  for (const [name, flow] of Object.entries(COMMANDS)) {
    context.subscriptions.push(vscode.commands.registerCommand(name, pw.guard(function () { return flow(this); })));
  }
  context.subscriptions.push(vscode.workspace.onDidChangeConfiguration((e) => {
    if (e.affectsConfiguration('patchwire')) {
      pw.startStatus();
    }
  }));
  pw.startStatus();
  return pw;
}

function deactivate() {}

module.exports = { activate, deactivate, COMMANDS };
