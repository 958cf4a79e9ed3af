/**
 * Attack: sizes at the edge of what a JavaScript number holds. `blkrep create IMAGE SIZE` must
 * say, for every size it cannot make, ERR_USAGE (exit 2) with the size as written and the limit —
 * never a number the double rounding made up (2^63 read back as 9223372036854776000), never node's
 * internals ("The value of "len" is out of range"), and no file left behind.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';

async function refusedCreate(format: 'qcow2' | 'raw', size: string): Promise<{ code: number | null; message: string; left: boolean }> {
  const image = join(await makeTempDir(), 'x.img');
  const r = await runCli(['create', '-f', format, image, size, '--json'], { timeoutMs: 30_000 });
  const out = JSON.parse(r.stdout) as { error: { code: string; message: string } };
  expect(out.error.code).toBe('ERR_USAGE');
  return { code: r.code, message: out.error.message, left: existsSync(image) };
}

describe('create: sizes at 2^53 and beyond', () => {
  it.each([
    ['9223372036854775808', 'invalid size "9223372036854775808": 2^53 bytes or more (at most 9007199254740991, 8P - 1)'],
    ['9007199254740993', 'invalid size "9007199254740993": 2^53 bytes or more (at most 9007199254740991, 8P - 1)'],
    ['8P', 'invalid size "8P": 2^53 bytes or more (at most 9007199254740991, 8P - 1)'],
    ['1.0000001', 'invalid size "1.0000001": 1.0000001 bytes is not a whole number of bytes'],
    ['9007199254740991', 'size 9007199254740991 is more than 9007199254740480 bytes (2^53 - 512), the largest a size rounded up to a multiple of 512 can be'],
  ])('%s → exit 2, %s (qcow2 and raw alike, no file made)', async (size, message) => {
    for (const format of ['qcow2', 'raw'] as const) {
      const r = await refusedCreate(format, size);
      expect(r.code).toBe(2);
      expect(r.message).toBe(message);
      expect(r.left).toBe(false);
    }
  });
});
