/**
 * Attack: a credential file that is not a regular file. serve-nbd reads the heartbeat key
 * (--heartbeat-key), the PSK file (--tls-psk), the x509 directory's PEM files and the allow-list
 * (--tls-authz) at start-up; a FIFO planted in their place (or a symlink to /dev/zero) must be
 * refused at once with the credential's error code, naming the file and what it is — not block
 * start-up until a writer opens the FIFO (as it did: open/readFileSync of a FIFO waits forever),
 * nor read an endless device into memory. And a heartbeat key owned by another user (not root)
 * is refused as ssh refuses such a private key: its owner chose the key, and could forge beats.
 */
import { execFileSync } from 'node:child_process';
import { chown, copyFile, mkdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';
import { makePki, type Pki } from '../support/tls-pki.js';

let pki: Pki;

beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

function mkfifo(path: string): void {
  execFileSync('mkfifo', ['-m', '600', path]);
}

/** serve-nbd with `args`: it must exit on its own within 15 s (a hang rejects with its output) */
async function refused(args: string[]): Promise<{ code: number | null; error: { code: string; message: string } }> {
  const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(await makeTempDir(), 's.sock'), '--json', ...args], { timeoutMs: 15_000 });
  return { code: r.code, error: (JSON.parse(r.stdout.trim().split('\n')[0]!) as { error: { code: string; message: string } }).error };
}

describe('serve-nbd: a credential file that is a FIFO or a device is refused at once', () => {
  it('--heartbeat-key FIFO → exit 1 ERR_HEARTBEAT_KEY "is not a regular file"', async () => {
    const key = join(await makeTempDir(), 'pair.key');
    mkfifo(key);
    const r = await refused(['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--heartbeat-key', key]);
    expect(r.code).toBe(1);
    expect(r.error).toEqual({ code: 'ERR_HEARTBEAT_KEY', message: `the heartbeat key ${key} is not a regular file` });
  });

  // root can give the key away to make the case; another user cannot
  it.skipIf(process.getuid?.() !== 0)('--heartbeat-key owned by another user (mode 0600, reached through a symlink too) → refused, naming the owner', async () => {
    const dir = await makeTempDir();
    const key = join(dir, 'planted.key');
    await writeFile(key, 'a key somebody else chose, 32 b.', { mode: 0o600 });
    await chown(key, 65534, 65534);
    const link = join(dir, 'pair.key');
    await symlink(key, link);
    for (const path of [key, link]) {
      const r = await refused(['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--heartbeat-key', path]);
      expect(r.code).toBe(1);
      expect(r.error).toEqual({ code: 'ERR_HEARTBEAT_KEY', message: `the heartbeat key ${path} is owned by uid 65534, not by this user (uid 0) or root: another user could have written it; chown it` });
    }
  });

  it('--tls-psk FIFO → exit 1 ERR_TLS_CREDENTIALS "not a regular file (the PSK file is a FIFO)"', async () => {
    const psk = join(await makeTempDir(), 'keys.psk');
    mkfifo(psk);
    const r = await refused(['--tls-psk', psk]);
    expect(r.code).toBe(1);
    expect(r.error).toEqual({ code: 'ERR_TLS_CREDENTIALS', message: `TLS credentials: ${psk}: not a regular file (the PSK file is a FIFO)` });
  });

  it('--tls-psk a symlink to /dev/zero → refused as a device, nothing read', async () => {
    const psk = join(await makeTempDir(), 'keys.psk');
    await symlink('/dev/zero', psk);
    const r = await refused(['--tls-psk', psk]);
    expect(r.code).toBe(1);
    expect(r.error).toEqual({ code: 'ERR_TLS_CREDENTIALS', message: `TLS credentials: ${psk}: not a regular file (the PSK file is a device)` });
  });

  it('--tls-psk of more than 1 MiB → refused with its size', async () => {
    const psk = join(await makeTempDir(), 'keys.psk');
    await writeFile(psk, Buffer.alloc(1024 * 1024 + 1, 0x41), { mode: 0o600 });
    const r = await refused(['--tls-psk', psk]);
    expect(r.code).toBe(1);
    expect(r.error).toEqual({ code: 'ERR_TLS_CREDENTIALS', message: `TLS credentials: ${psk}: 1048577 bytes, more than 1048576: not a credential file (the PSK file)` });
  });

  it('--tls-certificates DIR whose server-key.pem is a FIFO → refused, naming the private key', async () => {
    const certs = join(await makeTempDir(), 'certs');
    await mkdir(certs);
    for (const f of ['ca-cert.pem', 'server-cert.pem']) await copyFile(join(pki.good, f), join(certs, f));
    mkfifo(join(certs, 'server-key.pem'));
    const r = await refused(['--tls-certificates', certs]);
    expect(r.code).toBe(1);
    expect(r.error).toEqual({ code: 'ERR_TLS_CREDENTIALS', message: `TLS credentials: ${join(certs, 'server-key.pem')}: not a regular file (the server private key is a FIFO)` });
  });

  it('--tls-authz FILE that is a FIFO → refused (the allow-list is re-read at every connection: it must never block)', async () => {
    const authz = join(await makeTempDir(), 'authz');
    mkfifo(authz);
    const r = await refused(['--tls-certificates', pki.good, '--tls-authz', authz]);
    expect(r.code).not.toBe(0);
    expect(r.error.message).toContain(`${authz}: not a regular file (the authz allow-list is a FIFO)`);
  });
});
