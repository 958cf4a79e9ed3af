/** The primary's write gate: quorum (suspend/io-error, waived by resume-io), fencing freeze, demotion. */
import { describe, expect, it } from 'vitest';
import { IoFence, IoFenceFilter } from '../../src/heartbeat/io-fence.js';
import { MemoryNode } from '../../src/block/memory.js';

function gate(o: { onNoQuorum?: 'suspend-io' | 'io-error'; active?: boolean; holdsAcks?: boolean } = {}) {
  let quorum = true;
  const events: Array<[string, Record<string, unknown>]> = [];
  const fence = new IoFence({ active: () => o.active ?? true, quorum: () => quorum, publish: (e, f) => events.push([e, f]), ...(o.onNoQuorum ? { onNoQuorum: o.onNoQuorum } : {}), ...(o.holdsAcks ? { holdsAcks: true } : {}) });
  const node = new MemoryNode(1 << 20);
  const filter = new IoFenceFilter(node, fence);
  return { fence, filter, node, events, setQuorum: (q: boolean) => (quorum = q) };
}

const settled = async (p: Promise<unknown>): Promise<string> => Promise.race([p.then(() => 'done', (e: { code?: string }) => e.code ?? 'error'), new Promise<string>((r) => setImmediate(() => r('waiting')))]);

describe('io fence', () => {
  it('open: writes pass with no promise of its own; reads always pass', async () => {
    const { fence, filter, node } = gate({ onNoQuorum: 'suspend-io' });
    expect(fence.admit()).toBeUndefined();
    await filter.write(0, Buffer.alloc(512, 1));
    expect((await node.read(0, 512))[0]).toBe(1);
  });

  it('suspend-io: without quorum a write waits; a beat (quorumBack) lets it go', async () => {
    const { fence, filter, setQuorum, events } = gate({ onNoQuorum: 'suspend-io' });
    setQuorum(false);
    const w = filter.write(0, Buffer.alloc(512, 2));
    expect(await settled(w)).toBe('waiting');
    expect(fence.status()).toMatchObject({ state: 'suspended', waiting: 1, onNoQuorum: 'suspend-io' });
    setQuorum(true);
    fence.quorumBack();
    expect(await settled(w)).toBe('done');
    expect(events.map((e) => e[0])).toEqual(['io-suspended', 'io-resumed']);
    expect(events[0]![1]).toMatchObject({ cause: 'no-quorum' });
    expect(events[1]![1]).toEqual({ by: 'quorum', waiting: 1 });
  });

  it('resume-io waives quorum until the peer is heard again', async () => {
    const { fence, filter, setQuorum } = gate({ onNoQuorum: 'suspend-io' });
    setQuorum(false);
    const w = filter.write(0, Buffer.alloc(512));
    expect(fence.resume('resume-io')).toEqual({ resumed: true, waiting: 1 });
    expect(await settled(w)).toBe('done');
    expect(await settled(filter.write(0, Buffer.alloc(512)))).toBe('done');
    fence.quorumBack();
    expect(await settled(filter.write(0, Buffer.alloc(512)))).toBe('waiting');
  });

  it('io-error: without quorum every write, zero, trim and flush fails with ERR_NO_QUORUM (EIO); reads pass', async () => {
    const { filter, setQuorum } = gate({ onNoQuorum: 'io-error' });
    setQuorum(false);
    for (const op of [() => filter.write(0, Buffer.alloc(512)), () => filter.writeZeroes(0, 512), () => filter.trim(0, 512), () => filter.flush()]) {
      await expect(op()).rejects.toMatchObject({ code: 'ERR_NO_QUORUM', errno: 'EIO' });
    }
    expect(await filter.read(0, 512)).toHaveLength(512);
  });

  it('a fencing freeze is not lifted by a beat, only by resume()', async () => {
    const { fence, filter } = gate();
    fence.suspend('--fencing resource-and-stonith');
    const w = filter.write(0, Buffer.alloc(512));
    fence.quorumBack();
    expect(await settled(w)).toBe('waiting');
    fence.resume('fence');
    expect(await settled(w)).toBe('done');
  });

  it('demoted: waiting writes and every later one fail with ERR_DEMOTED; resume is refused; even when not primary', async () => {
    const { fence, filter, events } = gate({ onNoQuorum: 'suspend-io' });
    fence.suspend('x');
    const w = filter.write(0, Buffer.alloc(512));
    fence.demote('peer took over');
    expect(await settled(w)).toBe('ERR_DEMOTED');
    await expect(filter.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'ERR_DEMOTED', errno: 'EIO' });
    expect(() => fence.resume('resume-io')).toThrow(expect.objectContaining({ code: 'ERR_DEMOTED' }));
    expect(events.at(-1)).toEqual(['demoted', { reason: 'peer took over', refusedWaiting: 1 }]);
  });

  it('not primary: quorum is not checked', async () => {
    const { filter, setQuorum } = gate({ onNoQuorum: 'io-error', active: false });
    setQuorum(false);
    await filter.write(0, Buffer.alloc(512));
  });

  it('holdsAcks: a write in flight when the link-loss freeze comes is not acknowledged until it is lifted; later ones wait at the gate', async () => {
    const { fence, filter, node, events } = gate({ holdsAcks: true });
    // the write is below the gate (its forward in flight) when the link is lost
    let finish!: () => void;
    const below = new Promise<void>((r) => (finish = r));
    const write = node.write.bind(node);
    node.write = (off, data, o) => below.then(() => write(off, data, o));
    const inFlight = filter.write(0, Buffer.alloc(512, 7));
    fence.suspend('--fencing resource-and-stonith: the data link was lost', false, 'link-lost');
    finish();
    expect(await settled(inFlight)).toBe('waiting');
    expect((await node.read(0, 512))[0]).toBe(7); // on the disk, not acknowledged
    const later = filter.write(512, Buffer.alloc(512, 8));
    expect(await settled(later)).toBe('waiting');
    expect(fence.status()).toMatchObject({ state: 'suspended', cause: 'link-lost', waiting: 2 });
    fence.quorumBack(); // a beat does not lift a fencing freeze
    expect(await settled(inFlight)).toBe('waiting');
    expect(fence.linkBack()).toBe(true);
    expect(await settled(inFlight)).toBe('done');
    expect(await settled(later)).toBe('done');
    expect(events).toEqual([
      ['io-suspended', { reason: '--fencing resource-and-stonith: the data link was lost', cause: 'link-lost' }],
      ['io-resumed', { by: 'link-back', waiting: 2 }],
    ]);
    expect(fence.status()).toMatchObject({ state: 'open', cause: null, reason: null });
  });

  it('without holdsAcks a completion passes a freeze (resource-only, quorum); a quorum suspension holds no completion', async () => {
    const { fence, filter, node } = gate({ holdsAcks: true, onNoQuorum: 'suspend-io' });
    let finish!: () => void;
    const below = new Promise<void>((r) => (finish = r));
    const write = node.write.bind(node);
    node.write = (off, data, o) => below.then(() => write(off, data, o));
    const inFlight = filter.write(0, Buffer.alloc(512));
    fence.suspend('no-quorum', true);
    finish();
    expect(await settled(inFlight)).toBe('done');
    const plain = gate();
    plain.fence.suspend('peer dead');
    expect(plain.fence.release()).toBeUndefined();
    expect(await settled(plain.filter.flush())).toBe('waiting'); // admitted writes still wait at the gate
  });

  it('peerConfirmedOutdated lifts a fencing freeze (peer-outdated), not a quorum suspension; a freeze takes a quorum suspension over', async () => {
    const { fence, filter, events, setQuorum } = gate({ holdsAcks: true, onNoQuorum: 'suspend-io' });
    setQuorum(false);
    const w = filter.write(0, Buffer.alloc(512));
    expect(fence.peerConfirmedOutdated()).toBe(false);
    expect(fence.linkBack()).toBe(false);
    fence.suspend('link lost', false, 'link-lost');
    setQuorum(true);
    fence.quorumBack();
    expect(await settled(w)).toBe('waiting');
    expect(fence.peerConfirmedOutdated()).toBe(true);
    expect(await settled(w)).toBe('done');
    expect(events.map((e) => [e[0], e[1].cause ?? e[1].by])).toEqual([
      ['io-suspended', 'no-quorum'],
      ['io-suspended', 'link-lost'],
      ['io-resumed', 'peer-outdated'],
    ]);
  });

  it('demoted while a completion is held: the write fails with ERR_DEMOTED', async () => {
    const { fence, filter, node } = gate({ holdsAcks: true });
    let finish!: () => void;
    const below = new Promise<void>((r) => (finish = r));
    const write = node.write.bind(node);
    node.write = (off, data, o) => below.then(() => write(off, data, o));
    const inFlight = filter.write(0, Buffer.alloc(512));
    fence.suspend('link lost', false, 'link-lost');
    finish();
    expect(await settled(inFlight)).toBe('waiting');
    fence.demote('peer took over');
    expect(await settled(inFlight)).toBe('ERR_DEMOTED');
  });
});
