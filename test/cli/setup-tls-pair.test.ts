/**
 * The wizard's TLS pair end to end: `blkrep setup --yes` for the secondary and then the primary
 * (x509 and psk) into scratch roots, the keys copied as its next commands say, both daemons
 * started from the config files it wrote, a write through the primary over the Unix socket, a
 * checkpoint, and the bytes read back from the secondary's disk. The pair link is nbds://.
 */
import { spawnSync } from 'node:child_process';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;

async function disk(dir: string, name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, '');
  spawnSync('truncate', ['-s', String(size), path]);
  return path;
}

function setupArgs(role: 'primary' | 'secondary', root: string, img: string, port: number, tls: 'x509' | 'psk'): string[] {
  const ids = role === 'secondary' ? ['--node-id', 'nodeb', '--peer-id', 'nodea', '--listen', '127.0.0.1'] : ['--node-id', 'nodea', '--peer-id', 'nodeb', '--peer-disk-size', String(16 * MiB), '--no-check'];
  return ['setup', '--yes', '--json', '--name', 'p1', '--role', role, '--disk', img, '--peer', '127.0.0.1', '--port', String(port), '--tls', tls, '--heartbeat', 'none', ...ids, '--root', root];
}

describe.runIf(hasTool('qemu-io') && hasTool('openssl'))('blkrep setup: a TLS pair from the files it writes', () => {
  for (const [tls, port, copy] of [
    ['x509', 21010, ['p1/peer-tls', 'p1/tls']],
    ['psk', 21020, ['p1/keys.psk', 'p1/keys.psk']],
  ] as const) {
    it(`${tls}: the primary replicates over nbds:// to the secondary; after a checkpoint the secondary's disk has the bytes`, async () => {
      const dir = await makeTempDir();
      const a = await disk(dir, 'a.img', 16 * MiB);
      const b = await disk(dir, 'b.img', 16 * MiB);
      const rootA = join(dir, 'rootA');
      const rootB = join(dir, 'rootB');
      const sec = await runCli(setupArgs('secondary', rootB, b, port, tls));
      expect(sec.code, sec.stderr).toBe(0);
      // the secondary's next commands: copy the credentials to the peer, then run setup there
      const next = (JSON.parse(sec.stdout) as { next: string[] }).next;
      const etcB = join(rootB, 'etc/blkrep');
      expect(next).toContain(tls === 'x509' ? `scp -rp ${join(etcB, 'p1/peer-tls')} 127.0.0.1:${join(etcB, 'p1/tls')}` : `scp -p ${join(etcB, 'p1/keys.psk')} 127.0.0.1:${join(etcB, 'p1/keys.psk')}`);
      await cp(join(etcB, copy[0]), join(rootA, 'etc/blkrep', copy[1]), { recursive: true });
      const pri = await runCli(setupArgs('primary', rootA, a, port, tls));
      expect(pri.code, pri.stderr).toBe(0);
      // the copied credentials are kept, nothing new is made on the primary
      expect((JSON.parse(pri.stdout) as { files: Array<{ path: string; changed: boolean }> }).files.filter((f) => f.changed).map((f) => f.path.slice(rootA.length))).toEqual(['/etc/blkrep/p1.yaml', '/etc/systemd/system/blkrep@.service']);

      const secondary = await serve(['--config', join(etcB, 'p1.yaml'), '--control', join(dir, 'b.ctl')]);
      const sockA = join(dir, 'a.sock');
      const primary = await serve(['--config', join(rootA, 'etc/blkrep/p1.yaml'), '--control', join(dir, 'a.ctl'), '--socket', sockA]);
      try {
        expect(JSON.parse(secondary.listeningLine).tls, secondary.listeningLine).toMatchObject({ mode: 'require', kind: tls === 'x509' ? 'x509+verify-peer' : 'psk' });
        await waitFor(
          async () => {
            const s = await runCli(['status', '--control', join(dir, 'a.ctl'), '--json']);
            return /"link":\s*"connected"/.test(s.stdout) ? true : undefined;
          },
          'the pair link to come up',
          { timeoutMs: 60_000, intervalMs: 300 },
        );
        const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa7 3M 1M', `nbd+unix:///p1?socket=${sockA}`]);
        expect(w.code, w.stderr).toBe(0);
        const c = await runCli(['checkpoint', '--control', join(dir, 'a.ctl'), '--json']);
        expect(c.code, c.stdout + c.stderr).toBe(0);
        expect((JSON.parse(c.stdout) as { epoch: number }).epoch).toBeGreaterThanOrEqual(1);
        const bytes = await readFile(b);
        expect(bytes.subarray(3 * MiB, 4 * MiB).every((x) => x === 0xa7)).toBe(true);
        expect(bytes.subarray(0, 3 * MiB).every((x) => x === 0)).toBe(true);
        expect(bytes.subarray(4 * MiB).every((x) => x === 0)).toBe(true);
        // the link really is TLS: the secondary's export requires it, and a client in clear text is refused
        const st = JSON.parse((await runCli(['status', '--control', join(dir, 'b.ctl'), '--json'])).stdout) as { exports: Array<{ tls: string; pair: { link: string } }> };
        expect(st.exports[0]).toMatchObject({ tls: 'require', pair: { link: 'connected' } });
        const clear = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', `nbd://127.0.0.1:${port}/p1`]);
        expect(clear.code).not.toBe(0);
      } finally {
        expect(await primary.stop()).toBe(0);
        expect(await secondary.stop()).toBe(0);
      }
    });
  }
});
