/**
 * The in-memory transport passes the transport compliance suite, and carries an NBD session:
 * an NbdServer attached to its connections answers a client speaking the wire protocol.
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { createMemoryTransport, MemoryTransport } from '../../src/engine/transport-memory.js';
import { NbdServer } from '../../src/nbd/server.js';
import { runTransportCompliance } from '../../src/testing/transport-compliance.js';

runTransportCompliance('memory', createMemoryTransport, () => '', { uriScheme: 'nbd+memory:' });

describe('memory transport', () => {
  it('refuses a name in use with ERR_ADDRESS_IN_USE, and frees it on close()', async () => {
    const network = new Map();
    const t = new MemoryTransport(network);
    const first = await t.listen('disk', { onConnection: (c) => c.stream.destroy() });
    await expect(t.listen('disk', { onConnection: () => {} })).rejects.toMatchObject({ code: 'ERR_ADDRESS_IN_USE', details: { address: 'disk' } });
    await first.close();
    const again = await t.listen('disk', { onConnection: () => {} });
    expect(again.address).toBe('disk');
    await again.close();
  });

  it('keeps networks apart: a name in one is not reachable from another', async () => {
    const a = new MemoryTransport(new Map());
    const b = new MemoryTransport(new Map());
    const l = await a.listen('x', { onConnection: (c) => c.stream.destroy() });
    await expect(b.connect('x')).rejects.toMatchObject({ code: 'ERR_CONNECT_FAILED' });
    await l.close();
  });

  it('carries an NBD handshake: the server sends its newstyle greeting through it', async () => {
    const server = new NbdServer({ exports: [{ name: 'disk', node: completeNode(new MemoryNode(1 << 20)) }] });
    const t = new MemoryTransport(new Map());
    const listener = await t.listen('nbd', { onConnection: (c) => server.attach(c) });
    const c = await t.connect('nbd');
    const greeting = await new Promise<Buffer>((resolve) => {
      let got = Buffer.alloc(0);
      c.stream.on('data', (chunk: Buffer) => {
        got = Buffer.concat([got, chunk]);
        if (got.length >= 18) resolve(got);
      });
    });
    // "NBDMAGIC" "IHAVEOPT" and the handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
    expect(greeting.subarray(0, 16).toString('latin1')).toBe('NBDMAGICIHAVEOPT');
    expect(greeting.readUInt16BE(16)).toBe(3);
    c.stream.destroy();
    await listener.close();
    await server.shutdown();
  });
});
