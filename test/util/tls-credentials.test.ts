/**
 * generatePairCredentials (src/util/tls-credentials.ts): the files and their modes, and that they
 * work: serve-nbd --tls-certificates with --tls-authz of the other node's client DN, our client
 * and nbdinfo (GnuTLS) with the node directories; serve-nbd --tls-psk with nbdinfo and our client.
 * Refusals: a directory with files in it, a name openssl or a URI cannot carry.
 */
import { randomBytes } from 'node:crypto';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { generatePairCredentials } from '../../src/util/tls-credentials.js';
import { hasTool, makeTempDir, run, serve } from '../support/spawn.js';
import { freePort } from '../support/tls-pki.js';

const mode = async (path: string): Promise<number> => (await stat(path)).mode & 0o777;

async function roundTrip(uri: string): Promise<void> {
  const c = await NbdClient.connect({ uri, reconnect: false, holdMs: 0 });
  try {
    const data = randomBytes(64 * 1024);
    await c.write(4096, data);
    await c.flush();
    const back = Buffer.alloc(data.length);
    await c.read(4096, back);
    expect(back.equals(data)).toBe(true);
  } finally {
    await c.close();
  }
}

describe('generatePairCredentials', () => {
  it('x509: a CA and per node a qemu-layout directory (modes 0700/0600/0644) that serve-nbd, our client and nbdinfo use', async () => {
    const dir = join(await makeTempDir(), 'pki');
    const creds = await generatePairCredentials(dir, { kind: 'x509', names: ['localhost', '127.0.0.1'], days: 40 });
    expect(creds).toMatchObject({
      kind: 'x509',
      dir,
      nodes: { localhost: join(dir, 'localhost'), '127.0.0.1': join(dir, '127.0.0.1') },
      clientDns: { localhost: 'O=blkrep,CN=localhost', '127.0.0.1': 'O=blkrep,CN=127.0.0.1' },
      caDir: join(dir, 'ca'),
    });
    const left = (Date.parse(creds.notAfter!) - Date.now()) / 86_400_000;
    expect(left).toBeGreaterThan(39);
    expect(left).toBeLessThanOrEqual(40);
    expect((await readdir(dir)).sort()).toEqual(['127.0.0.1', 'ca', 'localhost']);
    expect(await mode(dir)).toBe(0o700);
    for (const node of ['localhost', '127.0.0.1']) {
      const d = join(dir, node);
      expect((await readdir(d)).sort()).toEqual(['ca-cert.pem', 'client-cert.pem', 'client-key.pem', 'server-cert.pem', 'server-key.pem']);
      expect(await mode(d)).toBe(0o700);
      for (const f of ['server-key.pem', 'client-key.pem']) expect(await mode(join(d, f))).toBe(0o600);
      for (const f of ['ca-cert.pem', 'server-cert.pem', 'client-cert.pem']) expect(await mode(join(d, f))).toBe(0o644);
    }
    expect(await mode(join(dir, 'ca', 'ca-key.pem'))).toBe(0o600);
    expect((await readdir(join(dir, 'ca'))).sort()).toEqual(['ca-cert.pem', 'ca-key.pem']);

    // the secondary "localhost" lets in only the primary "127.0.0.1" by its client certificate
    const work = await makeTempDir();
    const port = await freePort();
    const sock = join(work, 's');
    const s = await serve(['memory:1M', '--socket', sock, '--port', String(port), '--tls-certificates', creds.nodes!.localhost!, '--tls-authz', creds.clientDns!['127.0.0.1']!]);
    expect(JSON.parse(s.listeningLine)).toMatchObject({ tls: { mode: 'require', kind: 'x509+verify-peer' } });
    await roundTrip(`nbds://localhost:${port}/?tls-certificates=${creds.nodes!['127.0.0.1']}`);
    await roundTrip(`nbds+unix:///?socket=${sock}&tls-certificates=${creds.nodes!['127.0.0.1']}`);
    // the node's own client certificate (a DN not in the list) is refused
    await expect(roundTrip(`nbds://localhost:${port}/?tls-certificates=${creds.nodes!.localhost}`)).rejects.toMatchObject({ code: 'ERR_TLS_REJECTED' });
    if (hasTool('nbdinfo')) {
      const r = await run('nbdinfo', ['--size', `nbds://localhost:${port}/?tls-certificates=${creds.nodes!['127.0.0.1']}`]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.trim()).toBe(String(1 << 20));
    }
  });

  it('psk: keys.psk (0600) in psktool\'s format, one 32-byte key per user; serve-nbd --tls-psk lets each in', async () => {
    const dir = join(await makeTempDir(), 'psk');
    const creds = await generatePairCredentials(dir, { kind: 'psk', names: ['node-a', 'node-b'] });
    expect(creds).toEqual({ kind: 'psk', dir, pskFile: join(dir, 'keys.psk'), usernames: ['node-a', 'node-b'] });
    expect(await mode(creds.pskFile!)).toBe(0o600);
    const lines = (await readFile(creds.pskFile!, 'utf8')).trimEnd().split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^node-a:[0-9a-f]{64}$/);
    expect(lines[1]).toMatch(/^node-b:[0-9a-f]{64}$/);
    expect(lines[0]!.slice(7)).not.toBe(lines[1]!.slice(7));
    const port = await freePort();
    await serve(['memory:1M', '--port', String(port), '--tls-psk', creds.pskFile!]);
    await roundTrip(`nbds://node-b@localhost:${port}/?tls-psk-file=${creds.pskFile}`);
    if (hasTool('nbdinfo')) {
      const r = await run('nbdinfo', ['--size', `nbds://node-a@localhost:${port}/?tls-psk-file=${creds.pskFile}`]);
      expect(r.code, r.stderr).toBe(0);
    }
  });

  it('refuses a directory with files (ERR_EXISTS, nothing touched), a bad name or validity (ERR_USAGE); an empty directory is fine', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'keys.psk'), 'old:00\n');
    await expect(generatePairCredentials(dir, { kind: 'psk', names: ['a'] })).rejects.toMatchObject({ code: 'ERR_EXISTS', details: { path: dir } });
    expect(await readFile(join(dir, 'keys.psk'), 'utf8')).toBe('old:00\n');
    const fresh = join(dir, 'new');
    await expect(generatePairCredentials(fresh, { kind: 'x509', names: ['bad name/'] })).rejects.toMatchObject({ code: 'ERR_USAGE', details: { name: 'bad name/' } });
    await expect(generatePairCredentials(fresh, { kind: 'psk', names: ['a:b'] })).rejects.toMatchObject({ code: 'ERR_USAGE' });
    await expect(generatePairCredentials(fresh, { kind: 'psk', names: [] })).rejects.toMatchObject({ code: 'ERR_USAGE' });
    await expect(generatePairCredentials(fresh, { kind: 'psk', names: ['a', 'a'] })).rejects.toMatchObject({ code: 'ERR_USAGE' });
    await expect(generatePairCredentials(fresh, { kind: 'x509', names: ['a'], days: 0 })).rejects.toMatchObject({ code: 'ERR_USAGE' });
    await expect(stat(fresh)).rejects.toMatchObject({ code: 'ENOENT' });
    const empty = await makeTempDir();
    const creds = await generatePairCredentials(empty, { kind: 'psk', names: ['a'] });
    expect(creds.pskFile).toBe(join(empty, 'keys.psk'));
    expect(await mode(empty)).toBe(0o700);
  });
});
