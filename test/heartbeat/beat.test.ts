/** The beat frame: round trip, authentication, replays, malformed frames, the key file. */
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { decodeBeat, encodeBeat, ReplayGuard, type Beat } from '../../src/heartbeat/beat.js';
import { readHeartbeatKey } from '../../src/heartbeat/key.js';

const KEY = Buffer.from('0123456789abcdef0123456789abcdef');
const beat = (over: Partial<Beat> = {}): Beat => ({ node: 'alpha', incarnation: 1_700_000_000_000n, seq: 1n, epoch: 7n, generation: '0123456789abcdef', ...over });

describe('beat frame', () => {
  it('round-trips every field, keyed and unkeyed', () => {
    for (const key of [KEY, undefined]) {
      const b = beat({ node: 'nœud-β', seq: (1n << 64n) - 1n, epoch: 0n });
      const frame = encodeBeat(b, key);
      expect(frame.length).toBe(40 + Buffer.byteLength('nœud-β') + 32);
      expect(decodeBeat(frame, key)).toEqual({ ok: true, beat: b });
    }
  });

  it('carries the primary flag (bit 1 of the flags, under the MAC): a forged flag is refused', () => {
    const frame = encodeBeat(beat({ primary: true }), KEY);
    expect(frame[5]).toBe(0b11);
    expect(decodeBeat(frame, KEY)).toEqual({ ok: true, beat: beat({ primary: true }) });
    expect(decodeBeat(encodeBeat(beat(), KEY), KEY)).toEqual({ ok: true, beat: beat() });
    const forged = Buffer.from(encodeBeat(beat(), KEY));
    forged[5] = 0b11;
    expect(decodeBeat(forged, KEY)).toMatchObject({ ok: false, reason: 'bad-mac' });
  });

  it('refuses a wrong key, a missing key and an unexpected key, each with its reason', () => {
    const frame = encodeBeat(beat(), KEY);
    expect(decodeBeat(frame, Buffer.from('another key of 16 bytes'))).toMatchObject({ ok: false, reason: 'bad-mac' });
    expect(decodeBeat(frame, undefined)).toMatchObject({ ok: false, reason: 'keyed' });
    expect(decodeBeat(encodeBeat(beat(), undefined), KEY)).toMatchObject({ ok: false, reason: 'unkeyed' });
  });

  it('refuses a frame with any bit flipped', () => {
    const frame = encodeBeat(beat(), KEY);
    for (let i = 0; i < frame.length; i++) {
      const bad = Buffer.from(frame);
      bad[i]! ^= 0x01;
      const d = decodeBeat(bad, KEY);
      expect(d.ok, `byte ${i}`).toBe(false);
    }
  });

  it('refuses malformed frames: short, wrong magic, wrong version, wrong length', () => {
    const frame = encodeBeat(beat(), KEY);
    const cases: Array<[string, Buffer]> = [
      ['empty', Buffer.alloc(0)],
      ['short', frame.subarray(0, 50)],
      ['magic', Buffer.concat([Buffer.from('XXXX'), frame.subarray(4)])],
      ['version', Buffer.from(frame).fill(3, 4, 5)],
      ['trailing byte', Buffer.concat([frame, Buffer.from([0])])],
      ['id length 0', Buffer.from(frame).fill(0, 6, 7)],
    ];
    for (const [what, bad] of cases) expect(decodeBeat(bad, KEY), what).toMatchObject({ ok: false, reason: 'malformed' });
  });

  it('refuses to encode what it could not decode', () => {
    expect(() => encodeBeat(beat({ node: '' }), KEY)).toThrow(RangeError);
    expect(() => encodeBeat(beat({ node: 'x'.repeat(65) }), KEY)).toThrow(RangeError);
    expect(() => encodeBeat(beat({ generation: 'xyz' }), KEY)).toThrow(RangeError);
    expect(() => encodeBeat(beat({ seq: -1n }), KEY)).toThrow(RangeError);
  });
});

describe('replay guard', () => {
  it('accepts increasing seq, refuses a replay and an older incarnation, accepts a restart', () => {
    const g = new ReplayGuard('beta', 'alpha');
    expect(g.check(beat({ seq: 1n })).ok).toBe(true);
    expect(g.check(beat({ seq: 2n })).ok).toBe(true);
    expect(g.check(beat({ seq: 2n }))).toMatchObject({ ok: false, reason: 'replay' });
    expect(g.check(beat({ seq: 1n }))).toMatchObject({ ok: false, reason: 'replay' });
    expect(g.check(beat({ seq: 5n, incarnation: 1n }))).toMatchObject({ ok: false, reason: 'replay' });
    // restarted: a later incarnation starts at seq 1 again
    expect(g.check(beat({ seq: 1n, incarnation: 1_700_000_000_001n })).ok).toBe(true);
    expect(g.check(beat({ seq: 3n }))).toMatchObject({ ok: false, reason: 'replay' });
  });

  it('refuses its own beats and a stranger\'s', () => {
    const g = new ReplayGuard('beta', 'alpha');
    expect(g.check(beat({ node: 'beta' }))).toMatchObject({ ok: false, reason: 'self' });
    expect(g.check(beat({ node: 'gamma' }))).toMatchObject({ ok: false, reason: 'unknown-node' });
  });
});

describe('heartbeat key file', () => {
  let dir: string | undefined;
  afterEach(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
    dir = undefined;
  });

  async function keyFile(content: Buffer | string, mode = 0o600): Promise<string> {
    dir ??= await mkdtemp(join(os.tmpdir(), 'blkrep-hbkey-'));
    const path = join(dir, `k${Math.random()}`);
    await writeFile(path, content);
    await chmod(path, mode);
    return path;
  }

  it('reads a 0600 file of 32 bytes', async () => {
    const path = await keyFile(KEY);
    expect((await readHeartbeatKey(path)).equals(KEY)).toBe(true);
  });

  it('refuses a missing, short, group-readable or directory key with ERR_HEARTBEAT_KEY', async () => {
    const short = await keyFile('short');
    const open = await keyFile(KEY, 0o644);
    await expect(readHeartbeatKey(join(os.tmpdir(), 'blkrep-no-such-key'))).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_KEY', details: { code: 'ENOENT' } });
    await expect(readHeartbeatKey(short)).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_KEY', details: { bytes: 5 }, message: expect.stringContaining('holds 5 bytes, at least 16') });
    await expect(readHeartbeatKey(open)).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_KEY', details: { mode: '0644' } });
    await expect(readHeartbeatKey(dir!)).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_KEY' });
  });
});
