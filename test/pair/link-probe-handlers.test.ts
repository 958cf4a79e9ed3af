/**
 * The held-link probe (secondary.ts probeLink): each hello while a link is held probes it. A live
 * link answers every probe; the probe must not leave a close handler on that link each time (a
 * primary retrying its hello against a secondary whose link another, live primary holds added
 * one per retry for as long as the held link lived).
 */
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { PairChannel } from '../../src/pair/messages.js';
import { SecondaryRole } from '../../src/pair/secondary.js';

type Probe = (this: unknown, link: PairChannel) => Promise<boolean>;

describe('held-link probe', () => {
  it('leaves no close handler on a live link that answered', async () => {
    const stream = new PassThrough();
    const link = new PairChannel(stream, 'test', () => {});
    const handlers = (): number => (link as unknown as { closeHandlers: unknown[] }).closeHandlers.length;
    const before = handlers();
    // the role's fields the probe uses; the pong is delivered as onMessage does (linkAnswered)
    const role = { linkProbe: undefined as Promise<boolean> | undefined, linkAnswered: undefined as (() => void) | undefined };
    const probe = (SecondaryRole.prototype as unknown as { probeLink: Probe }).probeLink;
    for (let i = 0; i < 50; i++) {
      const p = probe.call(role, link);
      expect(role.linkAnswered).toBeTypeOf('function');
      role.linkAnswered!();
      expect(await p).toBe(true);
      await new Promise((r) => setImmediate(r));
      expect(role.linkProbe).toBeUndefined();
    }
    expect(handlers()).toBe(before);
    // a probe still in flight ends with the link: closed, it says not alive
    const p = probe.call(role, link);
    link.close();
    expect(await p).toBe(false);
    expect(handlers()).toBe(0);
  });
});
