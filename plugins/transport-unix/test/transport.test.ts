import { mkdtempSync, rmSync } from 'node:fs';
import { lstat, mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Transports } from '../../../src/engine/registry.js';
import { runTransportCompliance } from '../../../src/testing/transport-compliance.js';
import hook from '../src/hook.js';
import { createUnixTransport } from '../src/index.js';

// One private directory for the compliance suite, a fresh socket path per listen.
const complianceDir = mkdtempSync(join(os.tmpdir(), 'blkrep-unix-'));
let socketCount = 0;
afterAll(() => rmSync(complianceDir, { recursive: true, force: true }));

runTransportCompliance('unix', createUnixTransport, () => join(complianceDir, `s${socketCount++}.sock`), { uriScheme: 'nbd+unix:' });

/** A socket file with nobody behind it, as a killed server leaves. */
async function makeStaleSocket(path: string): Promise<void> {
  const server = net.createServer();
  const bound = `${path}.tmp`;
  await new Promise<void>((resolve) => server.listen(bound, resolve));
  // Moved away, the file outlives the server (which unlinks only the name it bound).
  await rename(bound, path);
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

describe('unix transport', () => {
  let dir: string;
  const cleanups: Array<() => unknown> = [];

  beforeEach(async () => {
    dir = await mkdtemp(join(os.tmpdir(), 'blkrep-unix-'));
  });
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  async function listen(path: string) {
    const listener = await createUnixTransport().listen(path, { onConnection: (c) => c.stream.destroy() });
    cleanups.push(() => listener.close());
    return listener;
  }

  it('gives an nbd+unix URI with the socket path as a query parameter', async () => {
    const path = join(dir, 'nbd sock');
    const listener = await listen(path);
    expect(listener.address).toBe(path);
    expect(listener.uri('disk')).toBe(`nbd+unix:///disk?socket=${path.replace(' ', '%20')}`);
    expect(new URL(listener.uri('disk')).searchParams.get('socket')).toBe(path);
  });

  it('replaces a stale socket file', async () => {
    const path = join(dir, 'stale.sock');
    await makeStaleSocket(path);
    expect((await lstat(path)).isSocket()).toBe(true);
    const listener = await listen(path);
    const c = await createUnixTransport().connect(listener.address);
    c.stream.destroy();
  });

  it('refuses a socket a server answers on, naming the path, and leaves it working', async () => {
    const path = join(dir, 'live.sock');
    const first = await listen(path);
    const err = await createUnixTransport()
      .listen(path, { onConnection: () => {} })
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_ADDRESS_IN_USE' });
    expect((err as Error).message).toContain('address in use');
    expect((err as Error).message).toContain(path);
    const c = await createUnixTransport().connect(first.address);
    c.stream.destroy();
  });

  it('refuses to replace a file that is not a socket', async () => {
    const path = join(dir, 'precious');
    await writeFile(path, 'data');
    await expect(createUnixTransport().listen(path, { onConnection: () => {} })).rejects.toMatchObject({
      code: 'ERR_ADDRESS_IN_USE',
      message: expect.stringContaining('not a socket'),
    });
    expect((await stat(path)).isFile()).toBe(true);
  });

  it('removes the socket file on close()', async () => {
    const path = join(dir, 'gone.sock');
    const listener = await listen(path);
    expect((await lstat(path)).isSocket()).toBe(true);
    await listener.close();
    await expect(lstat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    await listener.close();
  });

  it('reports a missing socket by path', async () => {
    const path = join(dir, 'nobody.sock');
    await expect(createUnixTransport().connect(path)).rejects.toMatchObject({
      code: 'ERR_CONNECT_FAILED',
      message: expect.stringContaining(`${path}: no such socket`),
    });
  });

  it('rejects a path too long for a socket address', async () => {
    const path = join(dir, 'x'.repeat(200));
    await expect(createUnixTransport().listen(path, { onConnection: () => {} })).rejects.toMatchObject({
      code: 'ERR_BAD_ADDRESS',
      message: expect.stringMatching(/\d+ bytes long, the limit is 10[37]/),
    });
  });
});

describe('unix plugin hook', () => {
  it('registers the unix factory in the transport registry', async () => {
    const transports = new Transports();
    await hook.call({}, { transports });
    expect(transports.names()).toEqual(['unix']);
    expect(transports.get('unix').name).toBe('unix');
  });
});
