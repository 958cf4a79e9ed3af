/**
 * Attack: a hostile or broken primary's hello with fields the generation decision reads but the
 * secondary did not check: more history slots than a tuple has, an epoch that is a string or past
 * 2^53, a crashedPrimary "false" (truthy), a negative bitmapBytes.
 *
 * Before: five history slots made decide() throw inside the message handler, and the link was
 * closed with no refusal (a real primary sees "closed by the peer", ERR_PAIR_LINK_DOWN, and
 * retries for ever, its log saying nothing of why); the others were welcomed, the string epoch
 * compared as a string, "false" taken as a crashed primary. Now each is refused ERR_PAIR_PROTOCOL
 * naming the field and the value; the secondary keeps serving, its disk untouched, and a
 * well-formed hello is welcomed after them.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve } from '../support/spawn.js';
import { eventsOf, pairOf } from '../support/control.js';
import { openLink } from './scripted-primary.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const h = (i: number): string => `00000000000000${i}${i}`;

describe('attack: hello fields a hostile primary sets', () => {
  it('five history slots, a string or unsafe epoch, crashedPrimary "false", negative bitmapBytes: refused ERR_PAIR_PROTOCOL naming the field; the secondary keeps serving, its disk untouched', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 's.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const before = sha(await readFile(disk));
    const socket = join(dir, 's.sock');
    const ctl = join(dir, 's.ctl');
    const s = await serve([disk, '--secondary', '--socket', socket, '--control', ctl]);
    const ev = await eventsOf(ctl);
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ gi: { current: 'abcdef0123456789', bitmap: '0000000000000000', history: [h(1), h(2), h(3), h(4), h(5)] } }, 'hello: "gi" must be {current, bitmap, history[]} with at most 4 history slots (it has 5)'],
      [{ epoch: '3' }, 'hello: "epoch" must be a checkpoint number (a non-negative integer), not "3"'],
      [{ epoch: 1e20 }, 'hello: "epoch" must be a checkpoint number (a non-negative integer), not 100000000000000000000'],
      [{ crashedPrimary: 'false' }, 'hello: "crashedPrimary" must be true or false, not "false"'],
      [{ bitmapBytes: -4096 }, 'hello: "bitmapBytes" must be a byte count, not -4096'],
    ];
    for (const [fields, message] of cases) {
      const from = ev.events.length;
      const link = await openLink(socket, { size: SIZE, helloFields: fields });
      expect(link.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_PROTOCOL', message });
      expect(await ev.next('pair-refused', from)).toMatchObject({ code: 'ERR_PAIR_PROTOCOL', message });
      link.close();
    }
    expect(await pairOf(ctl)).toMatchObject({ link: 'none', epoch: 0 });
    const good = await openLink(socket, { size: SIZE });
    expect(good.answer.type).toBe('welcome');
    good.close();
    await ev.close();
    expect(await s.stop()).toBe(0);
    expect(sha(await readFile(disk))).toBe(before);
  }, 60_000);
});
