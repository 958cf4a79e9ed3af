#!/usr/bin/env node
/**
 * Target-outage scenario for a live mirror (issue 14, defect 7): not part of the test suite.
 *
 *   node scripts/target-outage.mjs [--runs N] [--seed S] [--policies stop,ignore,report,enospc] [--keep]
 *
 * Each run (seeded: the same seed gives the same timings): serve-nbd serves a 32 MiB raw image
 * (random data in half its MiB pieces); a live mirror (speed-limited so that it lasts a few
 * seconds) copies it onto a raw file served by qemu-nbd over a Unix socket; qemu-nbd is killed
 * (SIGKILL) after a seeded delay and restarted after a seeded outage (0.2 to 7 s: around the NBD
 * client's 5 s hold too); the job is resumed at a seeded moment (at the job-error event, at the
 * pause, or once the target is back, plus a seeded delay). Expected, per --on-target-error policy:
 *
 *   stop     the job pauses (io-status failed); after the resume it becomes ready (a second error
 *            while the target is still away may pause it again: then it is resumed again, up to
 *            5 times, and each such re-pause is counted); complete → the target equals the source
 *   ignore   the job retries by itself and becomes ready without a resume
 *   report, enospc   the job concludes with the error (a connection loss is not ENOSPC)
 *
 * A run that ends otherwise (a job that stays paused after a resume with the target back, a hang
 * past the bound, bytes that differ) is a failure: its seed, events and the daemon's stderr are
 * printed. Prints one JSON line per run and a summary. Needs `npm run build`, qemu-nbd, cmp.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const BIN = join(ROOT, 'bin', 'run.js');
const { ControlClient } = await import(join(ROOT, 'dist/src/control/client.js'));

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const SPEED = 8 * MiB;
const RUN_BOUND_MS = 60_000;

function args() {
  const a = process.argv.slice(2);
  const get = (k, d) => {
    const i = a.indexOf(k);
    return i < 0 ? d : a[i + 1];
  };
  return {
    runs: Number(get('--runs', '20')),
    seed: Number(get('--seed', '1')),
    policies: get('--policies', 'stop,ignore,report,enospc').split(','),
    keep: a.includes('--keep'),
  };
}

/** mulberry32 */
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function startProc(cmd, argv) {
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (s) => (out += s));
  child.stderr.setEncoding('utf8').on('data', (s) => (err += s));
  const exited = new Promise((resolve) => child.once('close', (code, signal) => resolve({ code, signal })));
  return { child, exited, out: () => out, err: () => err };
}

async function waitUntil(pred, what, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

async function image(path, r) {
  const fh = await open(path, 'w');
  await fh.truncate(SIZE);
  const piece = Buffer.alloc(MiB);
  for (let off = 0; off < SIZE; off += MiB) {
    if (r() < 0.5) continue;
    for (let i = 0; i < MiB; i += 4) piece.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
    await fh.write(piece, 0, MiB, off);
  }
  await fh.close();
}

function cmp(a, b) {
  return new Promise((resolve) => {
    const p = spawn('cmp', [a, b], { stdio: 'ignore' });
    p.once('close', (code) => resolve(code === 0));
  });
}

async function oneRun(policy, seed, keep) {
  const r = rng(seed);
  const dir = await mkdtemp(join(tmpdir(), 'blkrep-outage-'));
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const tsock = join(dir, 't.sock');
  const ctl = join(dir, 'ctl');
  const procs = [];
  const events = [];
  const plan = {
    killAfterMs: Math.round(200 + r() * 1800),
    outageMs: Math.round(200 + r() * 6800),
    resumeAt: ['error', 'paused', 'back'][Math.floor(r() * 3)],
    resumeDelayMs: Math.round(r() * 1000),
  };
  const result = { policy, seed, ...plan, ok: false, repauses: 0, resumes: 0, outcome: '', ms: 0 };
  const t0 = Date.now();
  let client;
  let daemon;
  const startTarget = () => {
    const q = startProc('qemu-nbd', ['-f', 'raw', '-k', tsock, '-t', '-e', '4', '--cache=writeback', dst]);
    procs.push(q);
    return q;
  };
  try {
    await image(src, r);
    await writeFile(dst, '');
    const fh = await open(dst, 'r+');
    await fh.truncate(SIZE);
    await fh.close();
    let target = startTarget();
    await waitUntil(() => existsSync(tsock), 'qemu-nbd socket', 10_000);
    daemon = startProc(process.execPath, [BIN, 'serve-nbd', '--export', `disk=${src}`, '--socket', join(dir, 'nbd'), '--control', ctl, '--json']);
    procs.push(daemon);
    await waitUntil(() => daemon.out().includes('"listening"'), 'serve-nbd listening', 60_000);
    client = await ControlClient.connect(ctl, { timeoutMs: 5000 });
    const waiters = [];
    await client.subscribe(undefined, (e) => {
      events.push({ t: Date.now() - t0, ...e });
      for (const w of waiters.splice(0)) w();
    });
    const waitEvent = async (pred, what, timeoutMs = RUN_BOUND_MS) => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const hit = events.find(pred);
        if (hit) return hit;
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`timed out waiting for ${what}`);
        await Promise.race([new Promise((res) => waiters.push(res)), sleep(Math.min(left, 200))]);
      }
    };
    const uri = `nbd+unix:///?socket=${tsock}`;
    await client.request('job-start', { type: 'mirror', target: uri, onTargetError: policy, speed: SPEED }, { timeoutMs: 10_000 });
    await sleep(plan.killAfterMs);
    target.child.kill('SIGKILL');
    await target.exited;
    const killedAt = Date.now() - t0;
    const restart = (async () => {
      await sleep(plan.outageMs);
      await rm(tsock, { force: true });
      target = startTarget();
      await waitUntil(() => existsSync(tsock), 'qemu-nbd socket after restart', 10_000);
      return Date.now() - t0;
    })();
    const query = () => client.request('job-query', { id: 'mirror0' }, { timeoutMs: 10_000 });
    const after = (pred) => (e) => e.t >= killedAt && pred(e);
    // the NBD client holds requests for 5 s: a shorter outage may end with no error at all
    const first = await waitEvent(after((e) => e.event === 'job-error' || (e.event === 'job-ready' && e.synced !== false) || (e.event === 'job-status-change' && e.status === 'concluded')), 'an error or the job ready');
    result.errored = first.event === 'job-error';
    if ((policy === 'report' || policy === 'enospc') && result.errored) {
      await waitEvent(after((e) => e.event === 'job-status-change' && e.status === 'concluded'), 'the job to conclude');
      await restart;
      const q = await query();
      result.ok = q.error !== undefined && first.action === 'report';
      result.outcome = result.ok ? `concluded with ${q.error.code}` : `unexpected: ${JSON.stringify(q)}`;
    } else {
      if (policy === 'stop' && result.errored) {
        const backAt = restart;
        let lastResumeAt = -1;
        for (let round = 0; round < 6; round++) {
          // the moment of the resume, as the plan says (later rounds: once paused again)
          if (round === 0 && plan.resumeAt === 'error') {
            // at the job-error event already
          } else if (round === 0 && plan.resumeAt === 'back') await backAt;
          else await waitEvent((e) => e.t > Math.max(killedAt, lastResumeAt) && e.event === 'job-status-change' && e.status === 'paused', 'the job to pause');
          await sleep(plan.resumeDelayMs);
          const q = await query();
          if (q.status === 'ready' || q.status === 'concluded') break;
          if (!q.paused) break;
          await client.request('job-resume', { id: 'mirror0' }, { timeoutMs: 10_000 });
          result.resumes++;
          lastResumeAt = Date.now() - t0;
          // ready, or paused again
          const next = await waitEvent(
            (e) => e.t >= lastResumeAt && ((e.event === 'job-ready' && e.synced !== false) || (e.event === 'job-status-change' && e.status === 'paused')),
            'ready or paused again after the resume',
          );
          if (next.event === 'job-ready') break;
          result.repauses++;
          const back = await Promise.race([backAt.then(() => true), sleep(0).then(() => false)]);
          if (back) result.repauseWithTargetBack = (result.repauseWithTargetBack ?? 0) + 1;
        }
      }
      await restart;
      await waitEvent(after((e) => e.event === 'job-ready' && e.synced !== false), 'job-ready after the outage');
      await client.request('job-complete', { id: 'mirror0', pivot: false }, { timeoutMs: RUN_BOUND_MS });
      target.child.kill('SIGTERM');
      await target.exited;
      const same = await cmp(src, dst);
      result.ok = same && (policy !== 'stop' || !result.errored || result.resumes >= 1);
      result.outcome = same ? 'completed, bytes identical' : 'completed, BYTES DIFFER';
    }
  } catch (err) {
    result.outcome = `FAILED: ${err.message}`;
    if (client) {
      try {
        result.lastQuery = await client.request('job-query', { id: 'mirror0' }, { timeoutMs: 3000 });
      } catch {
        // nothing more to learn
      }
    }
  } finally {
    result.ms = Date.now() - t0;
    await client?.close().catch(() => {});
    for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    if (!result.ok) {
      result.events = events.filter((e) => e.event.startsWith('job-')).map(({ t, event, status, action, errno, operation, message, synced }) => ({ t, event, status, action, errno, operation, synced, message }));
      result.daemonStderr = daemon?.err().slice(-2000);
    }
    if (!keep || result.ok) await rm(dir, { recursive: true, force: true });
    else result.dir = dir;
  }
  return result;
}

const opts = args();
const summary = {};
for (let i = 0; i < opts.runs; i++) {
  for (const policy of opts.policies) {
    const seed = opts.seed * 100_000 + i * 10 + opts.policies.indexOf(policy);
    const res = await oneRun(policy, seed, opts.keep);
    const s = (summary[policy] ??= { runs: 0, ok: 0, failed: 0, repauses: 0, repauseWithTargetBack: 0 });
    s.runs++;
    s[res.ok ? 'ok' : 'failed']++;
    s.repauses += res.repauses;
    s.repauseWithTargetBack += res.repauseWithTargetBack ?? 0;
    process.stdout.write(`${JSON.stringify(res)}\n`);
  }
}
process.stdout.write(`${JSON.stringify({ summary })}\n`);
process.exitCode = Object.values(summary).every((s) => s.failed === 0) ? 0 : 1;
