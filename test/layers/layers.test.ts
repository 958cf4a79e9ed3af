/**
 * The layers of src/ (.dependency-cruiser.cjs): the tree has no violation, and each rule fires
 * on a small tree made to break it (so that a rule that matches nothing cannot pass unseen).
 */
import { mkdir, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, REPO_ROOT, run } from '../support/spawn.js';

const DEPCRUISE = join(REPO_ROOT, 'node_modules', 'dependency-cruiser', 'bin', 'dependency-cruise.mjs');
const CONFIG = join(REPO_ROOT, '.dependency-cruiser.cjs');

interface Violation {
  rule: { name: string };
  from: string;
  to: string;
  cycle?: Array<{ name: string }>;
}

async function cruise(cwd: string, paths: string[]): Promise<Violation[]> {
  const r = await run(process.execPath, [DEPCRUISE, '--config', CONFIG, '--output-type', 'json', ...paths], { cwd, timeoutMs: 60_000 });
  if (r.stdout.trim() === '') throw new Error(`depcruise printed nothing (exit ${r.code}): ${r.stderr}`);
  const out = JSON.parse(r.stdout) as { summary: { violations: Violation[]; error: number } };
  return out.summary.violations;
}

/** "rule: from → to" per violation, for messages that say what is wrong */
const describeAll = (vs: Violation[]) => vs.map((v) => `${v.rule.name}: ${v.from} → ${v.to}${v.cycle ? ` (cycle ${v.cycle.map((c) => c.name).join(' → ')})` : ''}`);

describe('layers', () => {
  it('src/ and the transport and heartbeat plugins break no layering rule', async () => {
    const violations = await cruise(REPO_ROOT, ['src', 'plugins/transport-tcp/src', 'plugins/transport-unix/src', 'plugins/transport-tls/src', 'plugins/heartbeat-udp/src', 'plugins/heartbeat-tcp/src', 'plugins/heartbeat-file/src', 'plugins/heartbeat-exec/src', 'plugins/heartbeat-etcd/src']);
    expect(describeAll(violations)).toEqual([]);
  });

  it('each rule fires on a tree that breaks it', async () => {
    const dir = await makeTempDir();
    const files: Record<string, string> = {
      'tsconfig.json': JSON.stringify({ compilerOptions: { module: 'NodeNext', moduleResolution: 'NodeNext', strict: true } }),
      'package.json': JSON.stringify({ type: 'module' }),
      // a cycle closed by a lazy import, as open.ts ↔ qcow2 was
      'src/block/open.ts': "export async function open() { return (await import('./qcow2/node.js')).node; }\n",
      'src/block/qcow2/node.ts': "import { open } from '../open.js';\nexport const node = open;\n",
      // oclif inside the engine
      'src/jobs/job-command.ts': "import { Flags } from '@oclif/core';\nexport const f = Flags;\n",
      // the engine importing the daemon and the control socket (its wire format is allowed)
      'src/bitmap/verbs.ts': "import { d } from '../serve/daemon.js';\nimport { c } from '../control/server.js';\nimport { p } from '../control/protocol.js';\nexport const v = [d, c, p];\n",
      'src/serve/daemon.ts': "import { cmd } from '../cli/base.js';\nexport const d = cmd;\n",
      'src/control/server.ts': 'export const c = 1;\n',
      'src/control/protocol.ts': 'export const p = 1;\n',
      'src/cli/base.ts': 'export const cmd = 1;\n',
      // the contracts importing the engine
      'src/api/block.ts': "import type { node } from '../block/qcow2/node.js';\nexport type N = typeof node;\n",
    };
    for (const [path, text] of Object.entries(files)) {
      await mkdir(dirname(join(dir, path)), { recursive: true });
      await writeFile(join(dir, path), text);
    }
    await symlink(join(REPO_ROOT, 'node_modules'), join(dir, 'node_modules'));

    // node_modules is a symlink to the repository's, so its files resolve outside the tree
    const got = (await cruise(dir, ['src'])).map((v) => `${v.rule.name}: ${v.from} → ${v.to.replace(/^.*\/node_modules\//, 'node_modules/')}`).sort();
    expect(got).toEqual([
      'api-is-a-contract: src/api/block.ts → src/block/qcow2/node.ts',
      'daemon-not-cli: src/serve/daemon.ts → src/cli/base.ts',
      'engine-not-daemon-or-cli: src/bitmap/verbs.ts → src/control/server.ts',
      'engine-not-daemon-or-cli: src/bitmap/verbs.ts → src/serve/daemon.ts',
      'no-circular: src/block/open.ts → src/block/qcow2/node.ts',
      'oclif-only-in-cli: src/jobs/job-command.ts → node_modules/@oclif/core/lib/index.js',
    ]);
  });
});
