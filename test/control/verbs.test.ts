/**
 * test-control-verbs: the verb table. Every argument error of a verb names the verb, the field,
 * what was expected and what came (ERR_BAD_REQUEST), checked once against the schema before the
 * handler runs; blkrep-control(7) lists exactly the verbs a serve-nbd daemon answers.
 */
import { join } from 'node:path';
import { z } from 'zod';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { controlPageInput } from '../../scripts/gen-man.js';
import { ControlClient } from '../../src/control/client.js';
import { arg, parseVerbArgs, preview } from '../../src/control/verb.js';
import { argumentRows } from '../../src/man/control-page.js';
import { makeTempDir, serve } from '../support/spawn.js';

describe('parseVerbArgs', () => {
  const schema = z.object({ id: arg.name().describe('the job id'), speed: arg.uint().optional(), mode: arg.oneOf(['a', 'b']).optional() });

  it('returns the parsed arguments, unknown fields dropped', () => {
    expect(parseVerbArgs('v', schema, { id: 'j', speed: 3, other: 1 })).toEqual({ id: 'j', speed: 3 });
  });

  it('throws ERR_BAD_REQUEST naming the verb, the field, what was expected and what came', () => {
    const cases: Array<[unknown, string, string]> = [
      [{}, 'v: "id" (the job id) is required', 'id'],
      [{ id: '' }, 'v: "id" must be a non-empty string, got ""', 'id'],
      [{ id: 'j', speed: 'x' }, 'v: "speed" must be a non-negative integer, got "x"', 'speed'],
      [{ id: 'j', speed: -1 }, 'v: "speed" must be a non-negative integer, got -1', 'speed'],
      [{ id: 'j', speed: 2 ** 53 }, 'v: "speed" must be a non-negative integer, got 9007199254740992', 'speed'],
      [{ id: 'j', mode: 'c' }, 'v: "mode" must be one of a, b, got "c"', 'mode'],
      [{ id: [[[]]] }, 'v: "id" must be a non-empty string, got an array of 1', 'id'],
      [{ id: { a: 1 } }, 'v: "id" must be a non-empty string, got an object', 'id'],
    ];
    for (const [raw, message, field] of cases) {
      let err: unknown;
      try {
        parseVerbArgs('v', schema, raw);
      } catch (e) {
        err = e;
      }
      expect(err, message).toMatchObject({ code: 'ERR_BAD_REQUEST', errno: 'EINVAL', message, details: { verb: 'v', field } });
    }
  });

  it('names an unknown field of a strict object, with the fields it takes', () => {
    expect(() => parseVerbArgs('job-start', z.strictObject({ a: arg.bool().optional(), b: arg.bool().optional() }), { c: 1 }, 'job type x')).toThrow(
      'job-start: job type x takes no "c" (it takes a, b)',
    );
  });

  it('previews a value without echoing it whole', () => {
    expect(preview('y'.repeat(100))).toBe(`"${'y'.repeat(40)}"… (100 characters)`);
    expect(preview(null)).toBe('null');
    expect(preview([1, 2])).toBe('an array of 2');
    expect(preview(true)).toBe('true');
  });

  it('documents a schema as rows: name, required, type in words, description', () => {
    expect(argumentRows(schema)).toEqual([
      { name: 'id', required: true, type: 'a non-empty string', description: 'the job id' },
      { name: 'speed', required: false, type: 'a non-negative integer', description: '' },
      { name: 'mode', required: false, type: 'one of a, b', description: '' },
    ]);
  });
});

describe('the verbs of serve-nbd', () => {
  let ctl: string;
  let c: ControlClient;

  beforeAll(async () => {
    const dir = await makeTempDir('file');
    ctl = join(dir, 'ctl');
    await serve(['memory:16M', '--socket', join(dir, 'nbd'), '--control', ctl], { scope: 'file' });
    c = await ControlClient.connect(ctl);
    await c.request('bitmap-add', { name: 'b0' });
  }, 30_000);
  afterAll(async () => {
    await c?.close();
  });

  async function error(cmd: string, args: Record<string, unknown>): Promise<{ code: string; message: string }> {
    try {
      await c.request(cmd, args);
    } catch (err) {
      const e = err as { code: string; message: string };
      return { code: e.code, message: e.message };
    }
    throw new Error(`${cmd} succeeded`);
  }

  it('blkrep-control(7) documents exactly the verbs the daemon answers', async () => {
    const { message } = await error('no-such-verb', {});
    const known = /known commands: (.*)$/.exec(message)![1]!.split(', ');
    expect(controlPageInput().verbs.map((v) => v.name).sort()).toEqual(known);
    expect(controlPageInput().jobTypes.map((t) => t.type)).toEqual(await c.request('job-types'));
  });

  it('refuses arguments that do not fit, naming the verb, the field, what was expected and what came', async () => {
    const cases: Array<[string, Record<string, unknown>, string]> = [
      ['job-set-speed', { id: 'j', speed: 'x' }, 'job-set-speed: "speed" must be a number, got "x"'],
      ['job-set-speed', { id: 'j' }, 'job-set-speed: "speed" (bytes per second, 0 = unlimited) is required'],
      ['job-query', { id: '' }, 'job-query: "id" must be a non-empty string, got ""'],
      ['job-cancel', { id: 'j', force: 'yes' }, 'job-cancel: "force" must be true or false, got "yes"'],
      ['job-complete', { id: 'j', pivot: null }, 'job-complete: "pivot" must be true or false, got null'],
      ['job-list', { export: 3 }, 'job-list: "export" must be a string, got 3'],
      ['job-start', {}, 'job-start: "type" (the job type: mirror, backup, commit) is required'],
      ['job-start', { type: 5 }, 'job-start: "type" must be a job type name, got 5'],
      ['job-start', { type: 'mirror', target: 'x', maxOps: 'many' }, 'job-start: "maxOps" must be a number, got "many"'],
      ['job-start', { type: 'mirror', target: 'x', sync: 'half' }, 'job-start: "sync" must be one of full, top, none, bitmap, got "half"'],
      ['job-start', { type: 'mirror', target: '' }, 'job-start: "target" must be a non-empty string, got ""'],
      [
        'job-start',
        { type: 'backup', target: 'x', nope: 1 },
        'job-start: job type backup takes no "nope" (it takes target, targetFormat, sync, bitmap, bitmapMode, granularity, bufSize, maxOps, speed, targetIsZero, onSourceError, onTargetError, onCbwError, connections, fleecingExport, fleecingSocket)',
      ],
      [
        'job-start',
        { type: 'mirror', target: 'x', maxops: 4 },
        'job-start: job type mirror takes no "maxops" (it takes target, targetFormat, sync, bitmap, bitmapMode, granularity, bufSize, maxOps, speed, targetIsZero, copyMode, maxLagMs, onSourceError, onTargetError, connections, persist, existing)',
      ],
      ['job-start', { type: 'commit', keep: 1 }, 'job-start: "keep" must be true or false, got 1'],
      ['bitmap-add', { name: 5 }, 'bitmap-add: "name" must be a string, got 5'],
      ['bitmap-add', { name: 'b1', granularity: 1.5 }, 'bitmap-add: "granularity" must be a non-negative integer, got 1.5'],
      ['bitmap-dump', { name: 'b0', start: -1 }, 'bitmap-dump: "start" must be a non-negative integer, got -1'],
      ['bitmap-dump', { name: 'b0', start: 'z'.repeat(100) }, `bitmap-dump: "start" must be a non-negative integer, got "${'z'.repeat(40)}"… (100 characters)`],
      ['bitmap-dump', {}, `bitmap-dump: "name" (the bitmap's name) is required`],
      ['bitmap-clear', { name: 'b0', ranges: 'all' }, 'bitmap-clear: "ranges" must be an array of [offset, length] pairs, got "all"'],
      ['bitmap-fill', { name: 'b0', ranges: [[0, 1], [1]] }, 'bitmap-fill: "ranges[1]" must be [offset, length] of non-negative integers, got an array of 1'],
      ['bitmap-fill', { name: 'b0', ranges: [{ offset: 0, length: -1 }] }, 'bitmap-fill: "ranges[0].length" must be a non-negative integer, got -1'],
      [
        'bitmap-fill',
        { name: 'b0', ranges: Array.from({ length: 32769 }, () => [0, 0]) },
        'bitmap-fill: "ranges" at most 32768 ranges per request; send them in several requests, got an array of 32769',
      ],
      ['bitmap-merge', { name: 'b0', source: 'b0', sourceFile: 'f' }, 'bitmap-merge: give exactly one of "source" (a bitmap of the export) and "sourceFile" (a bitmap file)'],
      ['subscribe', { events: 'x' }, 'subscribe: "events" must be an array of event names, got "x"'],
      ['subscribe', { events: [1] }, 'subscribe: "events[0]" must be a string, got 1'],
    ];
    for (const [cmd, args, message] of cases) expect(await error(cmd, args), `${cmd} ${JSON.stringify(args).slice(0, 80)}`).toEqual({ code: 'ERR_BAD_REQUEST', message });
  });

  it('still runs the verbs with good arguments: ranges as pairs or objects, null for an absent optional bitmap field', async () => {
    expect(await c.request('bitmap-fill', { name: 'b0', ranges: [[0, 65536], { offset: 131072, length: 65536 }], export: null })).toMatchObject({ name: 'b0', changed: true });
    expect(await c.request('bitmap-dump', { name: 'b0', start: null })).toMatchObject({ runs: [[0, 65536], [131072, 65536]], next: null });
    expect(await c.request('job-list', {})).toEqual([]);
  });
});
