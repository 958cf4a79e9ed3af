/**
 * The library's entry point: src/index.ts exports the engine's public API, and package.json's
 * `main`/`exports` name its build (dist/src/index.js), which a program importing "blkrep" gets.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as blkrep from '../../src/index.js';
import { makeTempDir, REPO_ROOT, run } from '../support/spawn.js';

const MAIN_NAMES = [
  'BlkrepError', 'toBlkrepError',
  'openImage', 'registerImageFormat', 'probeFormat', 'MemoryNode', 'RawNode', 'NbdNode', 'Qcow2Node', 'completeNode',
  'NbdServer', 'NbdClient', 'parseNbdUri', 'Transports',
  'DirtyBitmap', 'PersistentBitmap', 'DirtyTrackingNode', 'openBitmapStore', 'registerBitmapStore',
  'JobManager', 'MirrorJob', 'BackupJob', 'CommitJob', 'ActiveCommitJob',
  'createImage', 'imageInfo', 'mapImage', 'compareImages', 'commitImage', 'makeEmpty',
  'Daemon', 'parseSize', 'formatSize',
];

describe('src/index.ts', () => {
  it('exports the main names of the engine, each a class or function', () => {
    const missing = MAIN_NAMES.filter((n) => typeof (blkrep as Record<string, unknown>)[n] !== 'function');
    expect(missing).toEqual([]);
  });

  it('opens a qcow2 overlay and its raw backing file through the format table the entry point fills', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.raw');
    await writeFile(base, Buffer.alloc(1 << 20, 0xab));
    const made = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', join(dir, 'top.qcow2')]);
    expect(made.stderr).toBe('');
    const node = await blkrep.openImage(join(dir, 'top.qcow2'), { readOnly: true });
    try {
      expect(node.driver).toBe('qcow2');
      expect((await node.read(4096, 4096)).equals(Buffer.alloc(4096, 0xab))).toBe(true);
    } finally {
      await node.close();
    }
    expect(blkrep.probeFormat(Buffer.from('514649fb00000003', 'hex'))).toBe('qcow2');
    expect(blkrep.probeFormat(Buffer.alloc(512))).toBe('raw');
  });

  it('package.json main and exports["."] name the build of src/index.ts, which `import "blkrep"` loads', async () => {
    const pkg = JSON.parse(await readFile(join(REPO_ROOT, 'package.json'), 'utf8')) as { main: string; exports: Record<string, string> };
    expect(pkg.main).toBe('./dist/src/index.js');
    expect(pkg.exports['.']).toBe('./dist/src/index.js');
    const r = await run(process.execPath, ['--input-type=module', '-e', "const m = await import('blkrep'); console.log(JSON.stringify([typeof m.openImage, typeof m.NbdServer, typeof m.Daemon]))"], { cwd: REPO_ROOT });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual(['function', 'function', 'function']);
  });

  it('exports the transport compliance suite for third-party plugins (blkrep/testing/transport-compliance)', async () => {
    const r = await run(process.execPath, ['--input-type=module', '-e', "console.log(import.meta.resolve('blkrep/testing/transport-compliance'))"], { cwd: REPO_ROOT });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe(`file://${join(REPO_ROOT, 'dist/src/testing/transport-compliance.js')}`);
  });
});
