/**
 * The client against a server that lies (checklist item 40, and the "hostile server"):
 * every inconsistent reply is a hard disconnect with ERR_NBD_PROTOCOL, never a crash or a huge
 * allocation; error chunks (known, or unknown with bit 15) fail only their request; replies may
 * come in any order; ESHUTDOWN gets a DISC and the request is retried on the next connection.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { CHUNK, CMD, OPT, REP, REPLY_FLAG_DONE, TF } from '../../src/nbd/constants.js';
import { encodeOptionReply, type Request } from '../../src/nbd/codec.js';
import { isAbortError } from '../../src/api/errors.js';
import { HOSTILE_FLAGS, reply, startHostile, type HostileConnection, type HostileOptions, type HostileServer } from './hostile-server.js';
import { nextEvent, pattern, rejection } from './helpers.js';
import { waitFor } from '../support/spawn.js';

let server: HostileServer | undefined;
let client: NbdClient | undefined;

afterEach(async () => {
  await client?.close();
  client = undefined;
  await server?.close();
  server = undefined;
});

async function connect(options: HostileOptions, clientOptions: Partial<Parameters<typeof NbdClient.connect>[0]> = {}): Promise<NbdClient> {
  server = await startHostile(options);
  client = await NbdClient.connect({ uri: server.uri, reconnect: false, closeTimeoutMs: 2000, ...clientOptions });
  return client;
}

/** A read of `length` at `offset` answered by `answer`; resolves to the rejection, checking the disconnect. */
async function expectViolation(answer: (conn: HostileConnection, req: Request) => void, message: RegExp, length = 4096): Promise<void> {
  const c = await connect({ onRequest: (conn, req) => answer(conn, req) });
  const disconnected = nextEvent<{ error: { code: string } }>(c, 'disconnected');
  const err = await rejection(c.read(0, Buffer.alloc(length)));
  expect(err.code).toBe('ERR_NBD_PROTOCOL');
  expect(err.errno).toBe('EIO');
  expect(err.message).toMatch(message);
  expect((await disconnected).error.code).toBe('ERR_NBD_PROTOCOL');
  expect(c.state).toBe('DISCONNECTED');
  // nothing more goes to a server that cannot be trusted; without reconnect later calls fail at once
  expect((await rejection(c.read(0, Buffer.alloc(512)))).code).toBe('ERR_NBD_DISCONNECTED');
}

describe('hostile server: hard disconnect, never a crash', () => {
  it('a simple reply for an unknown cookie', async () => {
    await expectViolation((conn, req) => conn.send(...reply.simple({ ...req, cookie: req.cookie + 1000n }, 0)), /simple reply for unknown cookie/);
  });

  it('a structured chunk for an unknown cookie (2^64 - 1)', async () => {
    await expectViolation((conn) => conn.send(reply.none(0xffffffffffffffffn)), /chunk for unknown cookie 18446744073709551615/);
  });

  it('a NONE chunk with DONE for an unknown cookie under 2^32 (the write reply fast path falls back)', async () => {
    await expectViolation((conn, req) => conn.send(reply.none(req.cookie + 1000n)), /NONE chunk for unknown cookie 100\d/);
  });

  it('a NONE chunk without DONE in the reply to a write', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(...reply.raw(req.cookie, CHUNK.NONE, 0, 0, Buffer.alloc(0))) });
    const err = await rejection(c.write(0, Buffer.alloc(512)));
    expect(err.code).toBe('ERR_NBD_PROTOCOL');
    expect(err.message).toMatch(/NONE chunk without the DONE flag in the reply to write of 512 bytes at offset 0/);
  });

  it('an error chunk, then NONE with DONE, in the reply to a write: the write fails with the error', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(Buffer.concat([encodeErrorNotDone(reply.error(req.cookie, 28, 'no space')), reply.none(req.cookie)])) });
    const err = await rejection(c.write(0, Buffer.alloc(512)));
    expect(err).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'ENOSPC' });
    expect(err.message).toMatch(/write of 512 bytes at offset 0 failed on the server: ENOSPC \(28\): no space/);
    expect(c.state).toBe('READY');
  });

  it('a data chunk outside the request', async () => {
    await expectViolation((conn, req) => conn.send(...reply.data(req.cookie, 8192, Buffer.alloc(4096), true)), /data chunk for 4096 bytes at offset 8192 lies outside read of 4096 bytes at offset 0/);
  });

  it('a hole chunk running past the request', async () => {
    await expectViolation((conn, req) => conn.send(reply.hole(req.cookie, 2048, 4096, true)), /hole chunk for 4096 bytes at offset 2048 lies outside/);
  });

  it('a data chunk larger than asked (refused before its payload is read)', async () => {
    await expectViolation((conn, req) => conn.send(...reply.raw(req.cookie, CHUNK.OFFSET_DATA, REPLY_FLAG_DONE, 0xfffffff0)), /data chunk of 4294967272 bytes in the reply to read of 4096 bytes/);
  });

  it('an error chunk claiming 4 GiB (no allocation)', async () => {
    await expectViolation((conn, req) => conn.send(...reply.raw(req.cookie, CHUNK.ERROR, REPLY_FLAG_DONE, 0xffffffff)), /error chunk of 4294967295 bytes/);
  });

  it('a block status chunk claiming 4 GiB', async () => {
    const c = await connect({
      onRequest: (conn, req) => conn.send(...reply.raw(req.cookie, CHUNK.BLOCK_STATUS, REPLY_FLAG_DONE, 0xfffffffc)),
    });
    const err = await rejection(c.blockStatus(0, 4096));
    expect(err.code).toBe('ERR_NBD_PROTOCOL');
    expect(err.message).toMatch(/block status chunk of 4294967292 bytes/);
  });

  it('an unknown chunk type without the error bit', async () => {
    await expectViolation((conn, req) => conn.send(...reply.raw(req.cookie, 7, REPLY_FLAG_DONE, 0)), /unknown chunk type 7 \(not an error type\)/);
  });

  it('overlapping data chunks', async () => {
    await expectViolation((conn, req) => {
      conn.send(...reply.data(req.cookie, 0, Buffer.alloc(3000), false));
      conn.send(...reply.data(req.cookie, 2048, Buffer.alloc(2048), true));
    }, /overlaps an earlier chunk/);
  });

  it('DONE before the read is covered', async () => {
    await expectViolation((conn, req) => conn.send(...reply.data(req.cookie, 0, Buffer.alloc(1024), true)), /ended after covering 1024 bytes/);
  });

  it('a NONE chunk with a payload', async () => {
    await expectViolation((conn, req) => conn.send(...reply.raw(req.cookie, CHUNK.NONE, REPLY_FLAG_DONE, 4, Buffer.alloc(4))), /NONE chunk with a payload of 4 bytes/);
  });

  it('a reply with a bad magic', async () => {
    await expectViolation((conn) => conn.send(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')), /reply magic 0x48545450 is neither/);
  });

  it('a data chunk in the reply to a write', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(...reply.data(req.cookie, 0, Buffer.alloc(16), true)) });
    const err = await rejection(c.write(0, Buffer.alloc(16)));
    expect(err.code).toBe('ERR_NBD_PROTOCOL');
    expect(err.message).toMatch(/data chunk in the reply to write of 16 bytes at offset 0/);
  });

  it('structured chunks although structured replies were refused', async () => {
    const c = await connect({ structured: false, onRequest: (conn, req) => conn.send(...reply.data(req.cookie, 0, Buffer.alloc(512), true)) });
    expect(c.info.structured).toBe(false);
    const err = await rejection(c.read(0, Buffer.alloc(512)));
    expect(err.message).toMatch(/structured replies were not negotiated/);
  });

  it('block status for a context that was not selected', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(reply.blockStatus(req.cookie, 99, [[4096, 0]], true)) });
    const err = await rejection(c.blockStatus(0, 4096));
    expect(err.message).toMatch(/meta context id 99, which was not selected/);
  });

  it('every request on the connection fails, not only the one answered wrongly', async () => {
    const held: Request[] = [];
    const c = await connect({
      onRequest: (conn, req) => {
        held.push(req);
        if (held.length === 3) conn.send(...reply.simple({ ...req, cookie: 12345n }));
      },
    });
    const errs = await Promise.all([0, 1, 2].map((i) => rejection(c.read(i * 512, Buffer.alloc(512)))));
    for (const e of errs) expect(e.code).toBe('ERR_NBD_PROTOCOL');
  });
});

describe('hostile server: errors fail the request, the connection stays', () => {
  it('an unknown error chunk type with bit 15 fails the request with its errno (ENOSPC)', async () => {
    let n = 0;
    const c = await connect({
      onRequest: (conn, req) => {
        if (n++ === 0) {
          const p = Buffer.alloc(6 + 5);
          p.writeUInt32BE(28, 0);
          p.writeUInt16BE(5, 4);
          p.write('nope!', 6);
          conn.send(...reply.raw(req.cookie, 0x8123, REPLY_FLAG_DONE, p.length, p));
        } else {
          conn.send(...reply.data(req.cookie, Number(req.offset), Buffer.alloc(req.length, 0x5a), true));
        }
      },
    });
    const err = await rejection(c.write(0, Buffer.alloc(512)));
    expect(err.code).toBe('ERR_NBD_SERVER_ERROR');
    expect(err.errno).toBe('ENOSPC');
    expect(err.message).toMatch(/nope! \(error chunk of unknown type 33059\)/);
    const b = Buffer.alloc(512);
    await c.read(0, b);
    expect(b.every((x) => x === 0x5a)).toBe(true);
    expect(server!.connections.length).toBe(1);
    expect(c.state).toBe('READY');
  });

  it('an unknown error chunk type with a short payload counts as EINVAL', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(...reply.raw(req.cookie, 0x9000, REPLY_FLAG_DONE, 2, Buffer.alloc(2))) });
    const err = await rejection(c.read(0, Buffer.alloc(512)));
    expect(err.errno).toBe('EINVAL');
    expect(c.state).toBe('READY');
  });

  it('ERROR and ERROR_OFFSET chunks carry the server message and offset; the rest of the reply is still read', async () => {
    const c = await connect({
      onRequest: (conn, req) => {
        if (req.offset === 0) {
          conn.send(...reply.data(req.cookie, 0, Buffer.alloc(1024), false));
          conn.send(reply.error(req.cookie, 5, 'disk on fire', 2048));
        } else {
          conn.send(reply.error(req.cookie, 1, 'not yours'));
        }
      },
    });
    const e1 = await rejection(c.read(0, Buffer.alloc(4096)));
    expect(e1).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EIO' });
    expect(e1.message).toMatch(/read of 4096 bytes at offset 0 failed on the server: EIO \(5\): disk on fire/);
    expect(e1.details).toMatchObject({ errorOffset: 2048, serverMessage: 'disk on fire' });
    const e2 = await rejection(c.write(4096, Buffer.alloc(512)));
    expect(e2).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EPERM' });
    expect(c.state).toBe('READY');
  });

  it('an ERROR_OFFSET outside the request is a violation', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(reply.error(req.cookie, 5, 'x', 1 << 20)) });
    expect((await rejection(c.read(0, Buffer.alloc(4096)))).code).toBe('ERR_NBD_PROTOCOL');
  });

  it('unknown errno values are EINVAL (item 41), simple replies too', async () => {
    const c = await connect({ structured: false, onRequest: (conn, req) => conn.send(...reply.simple(req, 9999)) });
    const err = await rejection(c.read(0, Buffer.alloc(512)));
    expect(err).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EINVAL' });
    expect(err.message).toMatch(/error 9999, unknown to NBD, taken as EINVAL/);
    expect(c.state).toBe('READY');
  });
});

describe('hostile server: legal but unusual replies', () => {
  it('replies in reverse order, reads in data and hole chunks in any order', async () => {
    const content = pattern(64 * 1024, 3);
    const held: Request[] = [];
    const c = await connect({
      onRequest: (conn, req) => {
        held.push(req);
        if (held.length < 16) return;
        for (const r of held.reverse()) {
          const off = Number(r.offset);
          const half = r.length / 2;
          // second half first, as a hole when it is zero in `content`, else data; then the first half
          conn.send(...reply.data(r.cookie, off + half, content.subarray(off + half, off + r.length), false));
          conn.send(...reply.data(r.cookie, off, content.subarray(off, off + half), true));
        }
      },
    });
    const bufs = Array.from({ length: 16 }, () => Buffer.alloc(4096));
    await Promise.all(bufs.map((b, i) => c.read(i * 4096, b)));
    bufs.forEach((b, i) => expect(b.equals(content.subarray(i * 4096, (i + 1) * 4096))).toBe(true));
  });

  it('hole chunks read as zeros even into a dirty buffer', async () => {
    const c = await connect({
      onRequest: (conn, req) => {
        conn.send(reply.hole(req.cookie, 4096, 4096, false));
        conn.send(...reply.data(req.cookie, 0, Buffer.alloc(4096, 1), true));
      },
    });
    const b = Buffer.alloc(8192, 0xee);
    await c.read(0, b);
    expect(b.subarray(0, 4096).every((x) => x === 1)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 0)).toBe(true);
  });

  it('an abandoned request: its late reply is read and dropped, the connection stays', async () => {
    const held: Request[] = [];
    const c = await connect({ onRequest: (_conn, req) => held.push(req) });
    const ac = new AbortController();
    const target = Buffer.alloc(4096, 0x11);
    const p = c.read(0, target, { signal: ac.signal });
    await waitFor(() => held.length === 1, 'the read to reach the server');
    ac.abort();
    expect(isAbortError(await rejection(p))).toBe(true);
    server!.connections[0]!.send(...reply.data(held[0]!.cookie, 0, Buffer.alloc(4096, 0x22), true));
    const second = c.read(0, Buffer.alloc(512));
    await waitFor(() => held.length === 2, 'the second read');
    server!.connections[0]!.send(...reply.data(held[1]!.cookie, 0, Buffer.alloc(512), true));
    await second;
    expect(target.every((x) => x === 0x11)).toBe(true); // the caller's buffer was not touched after the abort
    expect(c.state).toBe('READY');
  });

  it('backpressure: nothing more is sent while the socket buffer is full', async () => {
    const c = await connect({ size: 16 * 1024 * 1024, onRequest: (conn, req) => conn.send(...reply.simple(req)) });
    const conn = server!.connections[0]!;
    conn.socket.pause(); // the server stops reading: the kernel buffers fill up
    const big = Buffer.alloc(4 * 1024 * 1024, 1);
    const writes = Array.from({ length: 20 }, (_, i) => c.write((i % 4) * big.length / 4, big.subarray(0, big.length / 4)));
    await new Promise((resolve) => setTimeout(resolve, 100));
    const st = c.status();
    expect(st.connections[0]!.inFlight).toBeLessThan(20);
    expect(st.queued).toBe(20 - st.connections[0]!.inFlight);
    conn.socket.resume();
    await Promise.all(writes);
    expect(conn.requests.length).toBe(20);
  });

  it('block status: descriptors per context, [length, flags]', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(reply.blockStatus(req.cookie, 7, [[1024, 3], [3072, 0]], true)) });
    const map = await c.blockStatus(0, 4096);
    expect(map.get('base:allocation')).toEqual([[1024, 3], [3072, 0]]);
  });

  it('ESHUTDOWN: DISC is sent, and the request is sent again on the next connection', async () => {
    const c = await connect(
      {
        onRequest: (conn, req) => {
          if (server!.connections.indexOf(conn) === 0) conn.send(...reply.simple(req, 108));
          else conn.send(...reply.data(req.cookie, Number(req.offset), Buffer.alloc(req.length, 0x77), true));
        },
      },
      { reconnect: true, holdMs: 5000, backoff: { initialMs: 10, maxMs: 50 } },
    );
    const b = Buffer.alloc(512);
    const disconnected = nextEvent<{ error: { errno: string } }>(c, 'disconnected');
    await c.read(0, b);
    expect(b.every((x) => x === 0x77)).toBe(true);
    expect((await disconnected).error.errno).toBe('ESHUTDOWN');
    expect(server!.connections[0]!.requests.map((r) => r.type)).toEqual([CMD.READ, CMD.DISC]);
  });

  it('ESHUTDOWN from a server that then ignores DISC: the connection is dropped after discTimeoutMs', async () => {
    const c = await connect(
      {
        ignoreDisc: true,
        onRequest: (conn, req) => {
          if (server!.connections.indexOf(conn) === 0) conn.send(...reply.simple(req, 108));
          else conn.send(...reply.simple(req));
        },
      },
      { reconnect: true, holdMs: 5000, discTimeoutMs: 200, backoff: { initialMs: 10, maxMs: 50 } },
    );
    const t0 = Date.now();
    await c.write(0, Buffer.alloc(512));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150);
    expect(server!.connections.length).toBe(2);
    expect(server!.connections[0]!.socket.destroyed || server!.connections[0]!.socket.readableEnded).toBe(true);
  });

  it('a server that always answers ESHUTDOWN: the request is retried for holdMs, then fails', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(...reply.simple(req, 108)) }, { reconnect: true, holdMs: 300, backoff: { initialMs: 10, maxMs: 20 } });
    const t0 = Date.now();
    const err = await rejection(c.read(0, Buffer.alloc(512)));
    expect(err).toMatchObject({ code: 'ERR_NBD_DISCONNECTED', errno: 'ESHUTDOWN' });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(server!.connections.length).toBeGreaterThan(2);
  });

  it('ESHUTDOWN without reconnect fails the request with ESHUTDOWN', async () => {
    const c = await connect({ onRequest: (conn, req) => conn.send(...reply.simple(req, 108)) });
    const err = await rejection(c.read(0, Buffer.alloc(512)));
    expect(err).toMatchObject({ code: 'ERR_NBD_DISCONNECTED', errno: 'ESHUTDOWN' });
  });

  it('GO refused with ERR_UNSUP: EXPORT_NAME instead (item 38)', async () => {
    const c = await connect({
      onOption: (conn, option) => {
        if (option !== OPT.GO) return false;
        conn.send(encodeOptionReply(option, REP.ERR_UNSUP));
        return true;
      },
      onRequest: (conn, req) => conn.send(...reply.simple(req)),
    });
    expect(c.info.viaExportName).toBe(true);
    expect(c.info.blockSize).toBeUndefined();
    expect(server!.connections[0]!.options).toEqual([OPT.STRUCTURED_REPLY, OPT.SET_META_CONTEXT, OPT.GO, OPT.EXPORT_NAME]);
    await c.flush();
  });

  it('never sends what the server does not advertise', async () => {
    const c = await connect({ flags: TF.HAS_FLAGS, onRequest: (conn, req) => conn.send(...reply.simple(req)) });
    for (const [p, what] of [
      [c.trim(0, 512), /does not offer trim/],
      [c.writeZeroes(0, 512), /does not offer write-zeroes/],
      [c.flush(), /does not offer flush/],
      [c.write(0, Buffer.alloc(512), { fua: true }), /does not offer FUA/],
      [c.cache(0, 512), /does not offer cache/],
      [c.read(0, Buffer.alloc(512), { df: true }), /does not offer DF/],
    ] as const) {
      const err = await rejection(p);
      expect(err).toMatchObject({ code: 'ERR_NBD_UNSUPPORTED', errno: 'EINVAL' });
      expect(err.message).toMatch(what);
    }
    await c.write(0, Buffer.alloc(512));
    expect(server!.connections[0]!.requests.map((r) => r.type)).toEqual([CMD.WRITE]);
  });

  it('a read-only export refuses writes locally with EPERM', async () => {
    const c = await connect({ flags: HOSTILE_FLAGS | TF.READ_ONLY, onRequest: (conn, req) => conn.send(...reply.simple(req)) });
    const err = await rejection(c.write(0, Buffer.alloc(512)));
    expect(err).toMatchObject({ code: 'ERR_NBD_READ_ONLY', errno: 'EPERM' });
    expect(server!.connections[0]!.requests).toEqual([]);
  });
});

/** an error chunk with its DONE flag cleared (bytes 4–5: the flags), so a NONE chunk ends the reply */
function encodeErrorNotDone(chunk: Buffer): Buffer {
  chunk.writeUInt16BE(chunk.readUInt16BE(4) & ~REPLY_FLAG_DONE, 4);
  return chunk;
}
