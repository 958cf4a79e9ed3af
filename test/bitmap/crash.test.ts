// test-bitmap-crash: kill -9 of a process writing through DirtyTrackingNode into a raw file with
// a persistent bitmap, at seeded random moments, 30 times (6 chains of 5 runs on the same files,
// so recovery of recovered files is exercised too; some kills land inside open()/recovery).
// After each kill the bitmap is loaded as the next process would: every region written since it
// was last cleared — acknowledged or only issued to the image (the child announces each write as
// it reaches the raw file) — must be dirty in it, or in a checkpoint that was requested after the
// write was issued. No run may load a bitmap that misses a written region.
//
// The child runs compiled JavaScript: dist/ when it is newer than src/bitmap (npm run build), else
// a private tsc build into a temp dir, so a stale dist/ is never tested.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { REPO_ROOT } from '../support/spawn.js';

const SEED = 0xdead_b17;
const KiB = 1024;
const MiB = 1024 * KiB;
const CHAINS = 6;
const RUNS_PER_CHAIN = 5;
const CHILD = join(REPO_ROOT, 'test', 'bitmap', 'crash-child.mjs');

let dir: string;
let libDir: string;

/** newest modification time of the sources the child needs */
function newestSource(): number {
  const files = [
    ...readdirSync(join(REPO_ROOT, 'src', 'bitmap')).map((f) => join(REPO_ROOT, 'src', 'bitmap', f)),
    ...['raw.ts', 'node.ts', 'native.ts', 'memory.ts'].map((f) => join(REPO_ROOT, 'src', 'block', f)),
    join(REPO_ROOT, 'src', 'api', 'errors.ts'),
  ];
  return Math.max(...files.map((f) => statSync(f).mtimeMs));
}

function compiledLib(): string {
  const dist = join(REPO_ROOT, 'dist');
  const built = join(dist, 'src', 'bitmap', 'index.js');
  if (existsSync(built) && statSync(built).mtimeMs >= newestSource() && readdirSync(join(dist, 'src', 'bitmap')).length > 0) {
    const stale = readdirSync(join(REPO_ROOT, 'src', 'bitmap'))
      .filter((f) => f.endsWith('.ts'))
      .some((f) => {
        const js = join(dist, 'src', 'bitmap', f.replace(/\.ts$/, '.js'));
        return !existsSync(js) || statSync(js).mtimeMs < statSync(join(REPO_ROOT, 'src', 'bitmap', f)).mtimeMs;
      });
    if (!stale) return dist;
  }
  const out = join(dir, 'lib');
  const tsc = join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
  const r = spawnSync(
    process.execPath,
    [tsc, '--outDir', out, '--rootDir', REPO_ROOT, '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--lib', 'es2023',
      '--types', 'node', '--strict', '--skipLibCheck', join(REPO_ROOT, 'src', 'bitmap', 'index.ts'), join(REPO_ROOT, 'src', 'block', 'raw.ts')],
    { encoding: 'utf8', timeout: 120_000 },
  );
  if (r.status !== 0) throw new Error(`tsc failed: ${r.stdout}${r.stderr}`);
  writeFileSync(join(out, 'package.json'), '{"type":"module"}\n');
  return out;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-bitmap-crash-'));
  libDir = compiledLib();
}, 120_000);
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/**
 * What must be dirty: for each granule, the line number of the latest write issued on it since
 * it was last cleared (-1: nothing required).
 */
class Required {
  readonly since: Int32Array;
  constructor(
    readonly size: number,
    readonly g: number,
  ) {
    this.since = new Int32Array(Math.ceil(size / g)).fill(-1);
  }
  write(offset: number, length: number, line: number): void {
    for (let i = Math.floor(offset / this.g); i < Math.ceil((offset + length) / this.g); i++) this.since[i] = line;
  }
  /** bitmap.clear(): granules wholly inside, except those touching a write in flight */
  clear(offset: number, length: number, inflight: Iterable<[number, number]>): void {
    const end = offset + length;
    const first = Math.ceil(offset / this.g);
    const last = end === this.size ? this.since.length : Math.floor(end / this.g);
    const keep = new Set<number>();
    for (const [o, l] of inflight) {
      const a = Math.max(o, offset);
      const b = Math.min(o + l, end);
      if (b > a) for (let i = Math.floor(a / this.g); i < Math.ceil(b / this.g); i++) keep.add(i);
    }
    for (let i = first; i < last; i++) if (!keep.has(i)) this.since[i] = -1;
  }
}

interface RunResult {
  lines: number;
  ready: boolean;
  writes: number;
}

/** Run the child until it has printed `killAfter` lines after READY (or until OPENING when negative), then SIGKILL it. */
function runChild(image: string, bitmap: string, seed: number, killAfter: number, model: Required, lineBase: number, k0: Map<number, number>): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CHILD, libDir, image, bitmap, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const inflight = new Map<number, [number, number]>();
    let after = -1;
    let lines = 0;
    let writes = 0;
    let ready = false;
    let killed = false;
    const kill = () => {
      if (!killed) {
        killed = true;
        child.kill('SIGKILL');
      }
    };
    const guard = setTimeout(kill, 30_000);
    const rl = createInterface({ input: child.stdout });
    rl.on('line', (line) => {
      const n = lineBase + ++lines;
      const [kind, a, b, c] = line.split(' ');
      if (kind === 'OPENING') {
        if (killAfter < 0) kill();
      } else if (kind === 'READY') {
        ready = true;
        after = 0;
      } else if (kind === 'S') {
        inflight.set(Number(a), [Number(b), Number(c)]);
      } else if (kind === 'I') {
        model.write(Number(a), Number(b), n);
        writes++;
      } else if (kind === 'D') {
        // the raw write settled: the filter's afterWrite follows at once, and with it the write
        // is over for bitmap.clear(); its A may come later still (a flush waiting for the writes
        // in flight resumes in between and may clear), so the write leaves the model's flight here
        for (const [id, [o, l]] of inflight) {
          if (o === Number(a) && l === Number(b)) {
            inflight.delete(id);
            break;
          }
        }
      } else if (kind === 'A') {
        inflight.delete(Number(a));
      } else if (kind === 'C') {
        model.clear(Number(a), Number(b), inflight.values());
      } else if (kind === 'K0') {
        k0.set(Number(a), n);
      }
      if (after >= 0 && ++after > killAfter) kill();
    });
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(guard);
      rl.close();
      if (signal !== 'SIGKILL') reject(new Error(`child exited ${code ?? signal} before it was killed: ${stderr}`));
      else resolve({ lines, ready, writes });
    });
  });
}

describe('persistent bitmap under kill -9', () => {
  it(`${CHAINS * RUNS_PER_CHAIN} seeded kills: every region written since the last clear is dirty after reopening`, async () => {
    const chains = fc.sample(
      fc.record({
        granularity: fc.constantFrom(512, 4096, 64 * KiB),
        extentSize: fc.constantFrom(64 * KiB, 256 * KiB, 1 * MiB),
        hotExtents: fc.integer({ min: 1, max: 24 }),
        sizeMiB: fc.integer({ min: 16, max: 48 }),
        tail: fc.constantFrom(0, 512, 1000),
        runs: fc.array(fc.record({ killAfter: fc.oneof({ weight: 1, arbitrary: fc.constant(-1) }, { weight: 6, arbitrary: fc.integer({ min: 0, max: 1500 }) }), seed: fc.nat() }), {
          minLength: RUNS_PER_CHAIN,
          maxLength: RUNS_PER_CHAIN,
        }),
      }),
      { seed: SEED, numRuns: CHAINS },
    );
    let stats = { runs: 0, recovered: 0, replayed: 0, writes: 0 };
    for (const [c, chain] of chains.entries()) {
      const size = chain.sizeMiB * MiB + chain.tail;
      const image = join(dir, `disk-${c}.raw`);
      const path = join(dir, `disk-${c}.bitmap`);
      writeFileSync(image, '');
      truncateSync(image, size);
      const created = await PersistentBitmap.create(path, { size, granularity: chain.granularity, extentSize: chain.extentSize, hotExtents: chain.hotExtents });
      await created.close();
      const model = new Required(size, chain.granularity);
      const k0 = new Map<number, number>();
      let lineBase = 0;
      for (const [r, run] of chain.runs.entries()) {
        const what = `chain ${c} (granularity ${chain.granularity}, extent ${chain.extentSize}, hot ${chain.hotExtents}, size ${size}) run ${r} (kill after ${run.killAfter}, seed ${run.seed})`;
        const result = await runChild(image, path, run.seed, run.killAfter, model, lineBase, k0);
        lineBase += result.lines;
        stats.runs++;
        stats.writes += result.writes;
        const { bitmap, loadState } = await PersistentBitmap.open(path, { size, readOnly: true });
        try {
          // a kill -9 tears nothing (the kernel keeps every write): never all-dirty
          expect(loadState.state, what).not.toBe('all-dirty');
          if (loadState.state === 'recovered') {
            stats.recovered++;
            stats.replayed += loadState.extentsReplayed;
          }
          // checkpoints requested after a write started may hold it instead of the live bitmap
          const checkpoints: Array<{ since: number; bitmap: DirtyBitmap }> = [];
          for (const info of await PersistentBitmap.listCheckpoints(path)) {
            const since = k0.get(info.number);
            if (since === undefined) continue;
            const ck = await PersistentBitmap.open(info.path, { readOnly: true, strict: true });
            checkpoints.push({ since, bitmap: ck.bitmap.bitmap });
            await ck.bitmap.close();
          }
          const live = bitmap.bitmap;
          for (let i = 0; i < model.since.length; i++) {
            const s = model.since[i]!;
            if (s < 0 || live.testBit(i)) continue;
            if (checkpoints.some((ck) => ck.since > s && ck.bitmap.testBit(i))) continue;
            expect.fail(`${what}: granule ${i} (bytes ${i * chain.granularity}…) written at line ${s} is clean after the crash (${JSON.stringify(loadState)})`);
          }
        } finally {
          await bitmap.close();
        }
      }
    }
    // the workload did what it is meant to: many writes, real recoveries from the log
    expect(stats.runs).toBe(CHAINS * RUNS_PER_CHAIN);
    expect(stats.writes).toBeGreaterThan(1000);
    expect(stats.recovered).toBeGreaterThan(CHAINS * RUNS_PER_CHAIN * 0.6);
    expect(stats.replayed).toBeGreaterThan(0);
  }, 240_000);
});
