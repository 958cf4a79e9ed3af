/**
 * test-control-fuzz: seeded fuzzing of the control protocol against a real serve-nbd process,
 * as test/nbd/fuzz.test.ts fuzzes the NBD codec. Lines are well-formed requests with random ids
 * and arguments, the same mutated (characters flipped, inserted, cut), nesting thousands deep,
 * and byte garbage. After each line the connection either answers it with one well-formed reply
 * line (id echoed when it was a string or a number, an ERR_* code, never ERR_INTERNAL) or is
 * closed; every wait is bounded. At the end the daemon is still up: status answers, nbdinfo reads
 * the size, the bitmap made before the fuzzing is still there.
 *
 * fast-check is seeded (CONTROL_FUZZ_SEED=n explores others); a failure prints the line.
 * Verbs that would stop the daemon or create files (shutdown, bitmap-add, job-start,
 * bitmap-remove) are left out of the generated names.
 */
import net from 'node:net';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { LineSplitter, MAX_REQUEST_LINE_BYTES } from '../../src/control/protocol.js';
import { makeTempDir, run, serve, unixUri, withTimeout, type Served } from '../support/spawn.js';

vi.setConfig({ testTimeout: 240_000, hookTimeout: 30_000 });

const SEED = Number(process.env.CONTROL_FUZZ_SEED ?? 0x63746c66); // "ctlf"
const RUNS = 1500;
const SIZE = 16 << 20;
const REPLY_MS = 10_000;

const SAFE_VERBS = [
  'status', 'subscribe', 'job-list', 'job-types', 'job-query', 'job-pause', 'job-resume', 'job-set-speed', 'job-set-copy-mode',
  'job-complete', 'job-cancel', 'bitmap-list', 'bitmap-clear', 'bitmap-enable', 'bitmap-disable', 'bitmap-merge', 'bitmap-dump',
  'bitmap-fill', 'bitmap-checkpoint', 'bitmap-checkpoints',
];
const FIELDS = ['id', 'export', 'name', 'ranges', 'all', 'start', 'length', 'limit', 'speed', 'mode', 'pivot', 'force', 'events', 'source', 'sourceFile', 'type'];

/** One control connection: send a line, get the next line or learn it closed. */
class Conn {
  private readonly splitter = new LineSplitter(64 << 20);
  private readonly lines: string[] = [];
  private wake: (() => void) | undefined;
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.lines.push(...this.splitter.push(chunk).lines);
      this.wake?.();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }
  static open(path: string): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new Conn(s)));
      s.once('error', reject);
    });
  }
  /** The next line that is not an event, or undefined when the connection closed first. */
  async nextReply(): Promise<string | undefined> {
    for (;;) {
      while (this.lines.length > 0) {
        const line = this.lines.shift()!;
        const parsed = JSON.parse(line) as Record<string, unknown>;
        if (typeof parsed.event === 'string' && !('ok' in parsed)) continue;
        return line;
      }
      if (this.closed) return undefined;
      await withTimeout(new Promise<void>((r) => (this.wake = r)), REPLY_MS, 'a reply or the close');
    }
  }
}

const jsonish = fc.jsonValue({ maxDepth: 4 });
const request = fc.record(
  {
    id: fc.oneof(fc.string({ maxLength: 20 }), fc.integer(), fc.double({ noNaN: true, noDefaultInfinity: true }), fc.constant(null), jsonish),
    cmd: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...SAFE_VERBS) }, { weight: 1, arbitrary: fc.string({ maxLength: 30 }) }, { weight: 1, arbitrary: jsonish }),
    args: fc.oneof(
      { weight: 5, arbitrary: fc.dictionary(fc.constantFrom(...FIELDS, 'b0', '__proto__'), fc.oneof(jsonish, fc.constant('b0'), fc.nat(SIZE * 2))) },
      { weight: 1, arbitrary: jsonish },
    ),
  },
  { requiredKeys: [] },
);
/** A line's text: JSON of a request, mutated; deep nesting; or bytes. */
const line = fc.oneof(
  { weight: 6, arbitrary: request.map((r) => Buffer.from(JSON.stringify(r))) },
  {
    weight: 3,
    arbitrary: fc
      .tuple(request, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0x20, max: 0x7e })), { minLength: 1, maxLength: 6 }))
      .map(([r, edits]) => {
        let s = JSON.stringify(r);
        for (const [at, kind, ch] of edits) {
          const i = s.length === 0 ? 0 : at % s.length;
          const c = String.fromCharCode(ch);
          s = kind === 0 ? s.slice(0, i) + c + s.slice(i + 1) : kind === 1 ? s.slice(0, i) + c + s.slice(i) : s.slice(0, i) + s.slice(i + 1);
        }
        return Buffer.from(s);
      }),
  },
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.integer({ min: 1, max: 20_000 }), fc.constantFrom('id', 'args', 'cmd'), fc.constantFrom('[', '{"a":'))
      .map(([depth, where, open]) => {
        const close = open === '[' ? ']' : '}';
        const deep = open.repeat(depth) + close.repeat(depth);
        const body = where === 'id' ? `"id":${deep},"cmd":"status"` : where === 'cmd' ? `"id":1,"cmd":${deep}` : `"id":1,"cmd":"bitmap-dump","args":{"name":"b0","start":${deep}}`;
        return Buffer.from(`{${body}}`);
      }),
  },
  { weight: 2, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 400 }).map((a) => Buffer.from(a)) },
  // over the 1 MiB limit: answered ERR_LINE_TOO_LONG, then closed
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 4096 }).map((extra) => Buffer.alloc(MAX_REQUEST_LINE_BYTES + extra, 0x7b)) },
);

function sentId(text: string): { echo: true; id: string | number } | { echo: false } {
  try {
    const v = JSON.parse(text) as unknown;
    if (v && typeof v === 'object' && !Array.isArray(v)) {
      const id = (v as { id?: unknown }).id;
      if (typeof id === 'string' || typeof id === 'number') return { echo: true, id };
    }
  } catch {
    // not JSON: the reply's id is null
  }
  return { echo: false };
}

/** A reply as the protocol says: {id, ok: true, result} or {id, ok: false, error: {code, message}}. */
function checkReply(text: string, sent: string): void {
  const reply = JSON.parse(text) as Record<string, unknown>;
  const where = `reply ${text.slice(0, 300)} to ${JSON.stringify(sent.slice(0, 300))}`;
  expect(reply, where).toBeTypeOf('object');
  expect(['string', 'number'].includes(typeof reply.id) || reply.id === null, where).toBe(true);
  if (reply.ok === true) {
    expect(Object.keys(reply).sort(), where).toEqual(['id', 'ok', 'result']);
  } else {
    expect(reply.ok, where).toBe(false);
    expect(Object.keys(reply).sort(), where).toEqual(['error', 'id', 'ok']);
    const error = reply.error as { code: unknown; message: unknown };
    expect(error.code, where).toMatch(/^ERR_[A-Z0-9_]+$/);
    expect(error.code, where).not.toBe('ERR_INTERNAL');
    expect(typeof error.message === 'string' && error.message.length > 0, where).toBe(true);
  }
  const s = sentId(sent);
  const id = (reply as { id: unknown }).id;
  if (s.echo) expect(id === s.id, `${where}: the id is echoed`).toBe(true);
  else expect(id, where).toBeNull();
}

describe('control protocol fuzzing against serve-nbd', () => {
  let dir: string;
  let ctl: string;
  let nbdSock: string;
  let daemon: Served;

  beforeAll(async () => {
    dir = await makeTempDir('file');
    ctl = join(dir, 'ctl');
    nbdSock = join(dir, 'nbd');
    daemon = await serve([`memory:${SIZE}`, '--socket', nbdSock, '--control', ctl], { scope: 'file' });
    const c = await ControlClient.connect(ctl);
    await c.request('bitmap-add', { name: 'b0', granularity: 65536 });
    await c.close();
  });
  afterAll(() => undefined);

  it(`${RUNS} lines (seed ${SEED}): each answered by one well-formed reply, or the connection closed; the daemon survives`, async () => {
    let conn = await Conn.open(ctl);
    let answered = 0;
    let closedAfter = 0;
    let tooLong = 0;
    await fc.assert(
      fc.asyncProperty(line, async (bytes) => {
        const payload = Buffer.from(bytes.map((b) => (b === 0x0a ? 0x20 : b)));
        const text = payload.toString('utf8');
        if (text.replace(/\r$/, '').trim() === '') return; // a blank line asks nothing
        if (conn.closed) conn = await Conn.open(ctl);
        conn.socket.write(Buffer.concat([payload, Buffer.from('\n')]));
        const reply = await conn.nextReply();
        if (reply === undefined) {
          closedAfter++;
          return;
        }
        checkReply(reply, text.replace(/\r$/, ''));
        answered++;
        if (payload.length > MAX_REQUEST_LINE_BYTES) {
          expect(JSON.parse(reply)).toMatchObject({ id: null, ok: false, error: { code: 'ERR_LINE_TOO_LONG' } });
          tooLong++;
          expect(await conn.nextReply()).toBeUndefined(); // then the daemon hangs up
          closedAfter++;
        }
      }),
      { seed: SEED, numRuns: RUNS, endOnFailure: true },
    );
    conn.socket.destroy();
    expect(answered).toBeGreaterThan(RUNS / 2);
    expect(tooLong).toBeGreaterThan(0);
    console.log(`control fuzz: ${answered} replies checked, ${tooLong} lines too long, ${closedAfter} connections closed by the daemon`);
    expect(daemon.child.exitCode).toBeNull();
    const info = await run('nbdinfo', ['--size', unixUri(nbdSock)]);
    expect(info.stdout.trim()).toBe(String(SIZE));
    const c = await ControlClient.connect(ctl);
    try {
      expect(await c.request('status')).toMatchObject({ control: ctl });
      expect(await c.request('bitmap-list')).toEqual([expect.objectContaining({ name: 'b0' })]);
    } finally {
      await c.close();
    }
  });
});
