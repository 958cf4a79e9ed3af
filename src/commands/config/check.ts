import { Args } from '@oclif/core';
import { BlkrepCommand } from '../../cli/base.js';
import { ConfigError, configArgv, loadConfigFile, scanArgv, type CommandShape, type ConfigIssue, type ConfigValues } from '../../config/file.js';

interface ConfigCheckResult {
  file: string;
  valid: true;
  /** the file's keys, as checked */
  values: ConfigValues;
  /** the same as serve-nbd's command line */
  argv: string[];
}

export default class ConfigCheck extends BlkrepCommand {
  /** bin/run.js loads every plugin and command before running it: it loads serve-nbd's command (this.config.findCommand) */
  static loadsAllPlugins = true;

  static override summary = 'Check a serve-nbd config file without starting anything.';

  static override description = `Reads FILE (YAML, or JSON when its name ends in .json) as blkrep serve-nbd --config FILE would, and checks every key: each is a long flag of serve-nbd (or "image"), each value is of the flag's kind (true/false for a switch, one of its choices, a size such as 64M, a duration such as 20s, a number in the flag's range, a list for a repeatable flag), and flags that need each other or exclude each other are checked as on the command line. Every problem is reported at once, each with the file, line and column, the key and what was expected.
Prints the equivalent serve-nbd command line. Files, certificates and peers the keys name are not opened: serve-nbd checks them when it starts.
Exit status: 0 the file is valid; 2 it is not (error ERR_CONFIG; with --json, {"error":{"code":"ERR_CONFIG","message","issues":[{"key","line","column","message"}]}}).`;

  static override examples = [
    { description: 'Check the file blkrep setup wrote', command: '<%= config.bin %> <%= command.id %> /etc/blkrep/pair0.yaml' },
    { description: 'In a script or an Ansible task', command: '<%= config.bin %> <%= command.id %> /etc/blkrep/pair0.yaml --json | jq .argv' },
  ];

  static override args = {
    file: Args.string({ description: 'the config file (YAML or JSON)', required: true }),
  };

  protected override toErrorJson(err: unknown): { error: { code: string; message: string; issues?: ConfigIssue[] } } {
    const base = super.toErrorJson(err);
    return err instanceof ConfigError ? { error: { ...base.error, issues: err.issues } } : base;
  }

  async run(): Promise<ConfigCheckResult> {
    const { args } = await this.parse(ConfigCheck);
    const serve = await this.config.findCommand('serve-nbd')?.load();
    if (!serve) throw new Error('the serve-nbd command is not installed');
    const shape = serve as unknown as CommandShape;
    const loaded = await loadConfigFile(args.file, shape);
    const words = configArgv(loaded.values, shape, scanArgv([], shape));
    const argv = [...words.args, ...words.flags];
    if (!this.jsonEnabled()) {
      this.log(`${args.file}: valid`);
      this.log(`  = ${this.config.bin} serve-nbd ${argv.map(shellQuote).join(' ')}`);
    }
    return { file: args.file, valid: true, values: loaded.values, argv };
  }
}

/** A word as a POSIX shell reads it back. */
function shellQuote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}
