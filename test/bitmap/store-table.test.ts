/**
 * The table of bitmap stores: the engine alone has no live store (a client of the control
 * socket, which the CLI registers), and says so; a registered slot is used.
 */
import { describe, expect, it } from 'vitest';
import { openBitmapStore, registerBitmapStore, type BitmapStore } from '../../src/bitmap/store.js';

describe('bitmap store table', () => {
  it('--control without a live store registered is ERR_NOT_SUPPORTED, naming the socket', async () => {
    await expect(openBitmapStore(undefined, { control: '/run/x.sock' })).rejects.toMatchObject({
      code: 'ERR_NOT_SUPPORTED',
      details: { target: '/run/x.sock', kind: 'live' },
      message: expect.stringContaining('--control /run/x.sock'),
    });
  });

  it('a registered slot opens the target, with the options and the opener for merge sources', async () => {
    const seen: unknown[] = [];
    registerBitmapStore('live', async () => async (target, options, open) => {
      seen.push(target, options.export, open === openBitmapStore);
      return { kind: 'live', description: `test ${target}` } as BitmapStore;
    });
    const store = await openBitmapStore(undefined, { control: '/run/y.sock', export: 'disk' });
    expect(store.description).toBe('test /run/y.sock');
    expect(seen).toEqual(['/run/y.sock', 'disk', true]);
  });
});
