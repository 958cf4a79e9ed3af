import { BlkrepCommand } from '../cli/base.js';
import { nativeStatus } from '../block/native.js';

interface VersionResult {
  name: string;
  version: string;
  node: string;
  platform: string;
  arch: string;
  /** the native addon (sparse I/O, image locks): loaded, or why not */
  native: { loaded: boolean; path?: string; reason?: string };
  plugins: Array<{ name: string; version: string }>;
}

export default class Version extends BlkrepCommand {
  /** bin/run.js loads every plugin and command before running it: it lists the plugins (this.config.plugins) */
  static loadsAllPlugins = true;

  static override summary = 'Show the version of blkrep, of Node, and whether the native addon is loaded.';

  static override description = `Prints blkrep's version, the Node.js version and platform, whether the native addon (sparse I/O, image locks) is loaded and, if not, why, and the installed plugins (transports, heartbeat backends). blkrep --version prints the one-line form; blkrep --version --json is this command's JSON.
Exit status: 0.`;

  static override examples = [
    { description: 'For a bug report', command: '<%= config.bin %> <%= command.id %>' },
    { description: 'In a script', command: '<%= config.bin %> <%= command.id %> --json | jq -r .version' },
  ];

  async run(): Promise<VersionResult> {
    await this.parse(Version);
    const result: VersionResult = {
      name: this.config.name,
      version: this.config.version,
      node: process.versions.node,
      platform: process.platform,
      arch: process.arch,
      native: nativeStatus(),
      plugins: this.config
        .getPluginsList()
        .filter((p) => p.name !== this.config.name)
        .map((p) => ({ name: p.name, version: p.version }))
        // oclif loads plugins concurrently: their list comes in no fixed order
        .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)),
    };
    if (!this.jsonEnabled()) {
      this.log(`${result.name} ${result.version} (node ${result.node}, ${result.platform}-${result.arch})`);
      this.log(`native addon: ${result.native.loaded ? `loaded (${result.native.path})` : `not loaded: ${result.native.reason}`}`);
      for (const p of result.plugins) this.log(`plugin ${p.name} ${p.version}`);
    }
    return result;
  }
}
