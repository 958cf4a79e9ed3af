/**
 * NbdServer.addExport / removeExport: an export added at run time is listed and served to new
 * connections; once removed it is no longer listed, INFO and GO give ERR_UNKNOWN, and the
 * sessions attached to it are disconnected (those on other exports are not).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT, REP } from '../../src/nbd/constants.js';
import { RawClient, infoPayload, type OptionReplyFrame } from '../support/raw-client.js';
import { pattern, startServer, waitConnections, type TestServer } from './helpers.js';

vi.setConfig({ testTimeout: 30_000, hookTimeout: 30_000 });

const SIZE = 1 << 20;
let S: TestServer;
const clients: RawClient[] = [];

beforeAll(async () => {
  S = await startServer({ handshakeTimeoutMs: 2000, exports: [{ name: 'base', node: completeNode(new MemoryNode(SIZE)) }] });
});

afterEach(() => {
  for (const c of clients.splice(0)) c.destroy();
});

afterAll(async () => {
  await S?.close();
});

async function optionsPhase(): Promise<RawClient> {
  const c = await RawClient.connect(S.path);
  clients.push(c);
  await c.readGreeting();
  c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  return c;
}

async function listNames(): Promise<string[]> {
  const c = await optionsPhase();
  const r = await c.option(OPT.LIST);
  expect(r[r.length - 1]!.type).toBe(REP.ACK);
  return r
    .slice(0, -1)
    .map((s: OptionReplyFrame) => s.data.toString('utf8', 4, 4 + s.data.readUInt32BE(0)))
    .sort();
}

async function lastReplyType(option: number, name: string): Promise<number> {
  const c = await optionsPhase();
  const r = await c.option(option, infoPayload(name, []));
  return r[r.length - 1]!.type >>> 0;
}

async function memoryWith(data: Buffer): Promise<MemoryNode> {
  const node = new MemoryNode(data.length);
  await node.write(0, data);
  return node;
}

describe('NbdServer.addExport / removeExport', () => {
  it('an added export is listed, in the status, and GO on it works and reads its data; read-only is kept', async () => {
    const data = pattern(SIZE, 11);
    S.srv.addExport({ name: 'snap', description: 'the view', node: completeNode(await memoryWith(data)), readOnly: true });
    expect(await listNames()).toEqual(['base', 'snap']);
    expect(S.srv.listExports().map((e) => e.name)).toEqual(['base', 'snap']);
    expect(S.srv.status().exports.find((e) => e.name === 'snap')).toMatchObject({ name: 'snap', description: 'the view', size: SIZE, readOnly: true });
    expect(await lastReplyType(OPT.INFO, 'snap')).toBe(REP.ACK);
    const { client, info } = await RawClient.open(S.path, { exportName: 'snap' });
    clients.push(client);
    expect(info.size).toBe(SIZE);
    expect((await client.read(4096, 65536)).equals(data.subarray(4096, 4096 + 65536))).toBe(true);
    expect(S.srv.removeExport('snap')).toBe(true);
  });

  it('a name that exists is refused with ERR_EXPORT_EXISTS naming it; the existing export is untouched', async () => {
    let err: unknown;
    try {
      S.srv.addExport({ name: 'base', node: completeNode(new MemoryNode(4096)) });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BlkrepError);
    expect(err).toMatchObject({ code: 'ERR_EXPORT_EXISTS' });
    expect((err as Error).message).toContain('"base"');
    expect(S.srv.findExport('base')!.size).toBe(SIZE);
  });

  it('after removeExport: not listed, INFO and GO give ERR_UNKNOWN, attached sessions are disconnected, others stay', async () => {
    const data = pattern(SIZE, 12);
    S.srv.addExport({ name: 'gone', node: completeNode(await memoryWith(data)), readOnly: true });
    const attached = await RawClient.open(S.path, { exportName: 'gone' });
    clients.push(attached.client);
    const other = await RawClient.open(S.path, { exportName: 'base' });
    clients.push(other.client);
    expect((await attached.client.read(0, 512)).equals(data.subarray(0, 512))).toBe(true);
    await waitConnections(S.srv, 2);
    const disconnects: Array<{ export: string | null; reason: string }> = [];
    const onDisconnect = (e: { export: string | null; reason: string }) => disconnects.push(e);
    S.srv.on('disconnect', onDisconnect);

    expect(S.srv.removeExport('gone', 'the job ended')).toBe(true);
    S.srv.removeListener('disconnect', onDisconnect);
    expect(disconnects).toEqual([expect.objectContaining({ export: 'gone', reason: 'the job ended' })]);
    await attached.client.expectEof();
    expect(attached.client.closed).toBe(true);
    // the other export's session goes on
    expect(other.client.closed).toBe(false);
    expect((await other.client.read(0, 512)).length).toBe(512);

    expect(await listNames()).toEqual(['base']);
    expect(S.srv.status().exports.map((e) => e.name)).toEqual(['base']);
    expect(S.srv.status().connections.map((c) => c.export)).not.toContain('gone');
    expect(S.srv.findExport('gone')).toBeUndefined();
    expect(await lastReplyType(OPT.GO, 'gone')).toBe(REP.ERR_UNKNOWN >>> 0);
    expect(await lastReplyType(OPT.INFO, 'gone')).toBe(REP.ERR_UNKNOWN >>> 0);
    // removing it again: nothing to remove
    expect(S.srv.removeExport('gone')).toBe(false);
    // the name can be used again
    S.srv.addExport({ name: 'gone', node: completeNode(new MemoryNode(4096)), readOnly: true });
    expect(await listNames()).toEqual(['base', 'gone']);
    S.srv.removeExport('gone');
  });
});
