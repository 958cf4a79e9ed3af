/**
 * The extension option that hands an NBD connection to another protocol (the pair link):
 * accepted, refused, unknown to a plain server (ours without it, and qemu-nbd), and the bytes
 * around the takeover.
 */
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { completeNode } from '../../src/block/node.js';
import { MemoryNode } from '../../src/block/memory.js';
import { openExtension, OPT_BLKREP_PAIR_LINK } from '../../src/nbd/option-takeover.js';
import type { OptionExtension } from '../../src/nbd/server-session.js';
import { startServer, withTimeout, type TestServer } from './helpers.js';
import { hasTool, killChildren, makeTempDir, start, waitFor } from '../support/spawn.js';

let S: TestServer | undefined;
afterEach(async () => {
  await S?.close();
  S = undefined;
  await killChildren();
});

function connect(socketPath: string): Promise<{ stream: Duplex; peer: string }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath, () => resolve({ stream: sock, peer: socketPath }));
    sock.once('error', reject);
  });
}

/** an extension that echoes every byte back, prefixed by the option data it was opened with */
function echo(refuse?: string): OptionExtension & { taken: number } {
  const ext = {
    name: 'echo link',
    taken: 0,
    accept(data: Buffer) {
      if (refuse !== undefined) return refuse;
      return (stream: Duplex, rest: Buffer) => {
        ext.taken++;
        stream.write(Buffer.concat([Buffer.from(`hello ${data.toString()}:`), rest]));
        stream.on('data', (b: Buffer) => stream.write(b));
        stream.on('end', () => stream.end());
        stream.resume();
      };
    },
  };
  return ext;
}

async function readN(stream: Duplex, n: number, first: Buffer): Promise<Buffer> {
  let got = first;
  if (got.length >= n) return got;
  return withTimeout(
    new Promise<Buffer>((resolve) => {
      const onData = (b: Buffer) => {
        got = Buffer.concat([got, b]);
        if (got.length >= n) {
          stream.off('data', onData);
          resolve(got);
        }
      };
      stream.on('data', onData);
      stream.resume();
    }),
    5000,
    `${n} bytes`,
  );
}

describe('extension option (pair link takeover)', () => {
  it('hands the connection over after ACK; bytes flow both ways; the server forgets the connection', async () => {
    const ext = echo();
    S = await startServer({ exports: [{ name: '', node: completeNode(new MemoryNode(65536)) }], optionExtensions: new Map([[OPT_BLKREP_PAIR_LINK, ext]]) });
    const opened = await openExtension(await connect(S.path), OPT_BLKREP_PAIR_LINK, Buffer.from('p1'));
    opened.connection.stream.write('ping');
    const got = await readN(opened.connection.stream, 'hello p1:'.length + 4, opened.rest);
    expect(got.toString()).toBe('hello p1:ping');
    expect(ext.taken).toBe(1);
    await waitFor(() => S!.srv.status().connections.length === 0, 'the session to be forgotten', { timeoutMs: 5000 });
    opened.connection.stream.destroy();
  });

  it('a refusal is NBD_REP_ERR_POLICY with the message, as ERR_NBD_SERVER_ERROR', async () => {
    S = await startServer({ exports: [{ name: '', node: completeNode(new MemoryNode(65536)) }], optionExtensions: new Map([[OPT_BLKREP_PAIR_LINK, echo('a primary is already connected')]]) });
    await expect(openExtension(await connect(S.path), OPT_BLKREP_PAIR_LINK, Buffer.alloc(0))).rejects.toMatchObject({
      code: 'ERR_NBD_SERVER_ERROR',
      message: expect.stringContaining('a primary is already connected'),
    });
  });

  it('a server without the extension answers ERR_UNSUP: ERR_NBD_UNSUPPORTED names a plain NBD server', async () => {
    S = await startServer({ exports: [{ name: '', node: completeNode(new MemoryNode(65536)) }] });
    await expect(openExtension(await connect(S.path), OPT_BLKREP_PAIR_LINK, Buffer.alloc(0))).rejects.toMatchObject({
      code: 'ERR_NBD_UNSUPPORTED',
      message: expect.stringContaining('plain NBD server'),
    });
  });

  it.runIf(hasTool('qemu-nbd'))('qemu-nbd is a plain NBD server: ERR_NBD_UNSUPPORTED', async () => {
    const dir = await makeTempDir();
    const sock = path.join(dir, 'q.sock');
    start('qemu-nbd', ['-f', 'raw', '-k', sock, '--persistent', '/dev/null']);
    await waitFor(async () => await connect(sock).then((c) => (c.stream.destroy(), true)).catch(() => false), 'qemu-nbd to listen', { timeoutMs: 10_000 });
    await expect(openExtension(await connect(sock), OPT_BLKREP_PAIR_LINK, Buffer.alloc(0))).rejects.toMatchObject({ code: 'ERR_NBD_UNSUPPORTED' });
  });

  it('a server that is not NBD: ERR_NBD_HANDSHAKE', async () => {
    const dir = await makeTempDir();
    const sock = path.join(dir, 'x.sock');
    const srv = net.createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await new Promise<void>((r) => srv.listen(sock, r));
    try {
      await expect(openExtension(await connect(sock), OPT_BLKREP_PAIR_LINK, Buffer.alloc(0))).rejects.toMatchObject({ code: 'ERR_NBD_HANDSHAKE' });
    } finally {
      srv.close();
    }
  });
});
