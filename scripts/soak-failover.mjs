#!/usr/bin/env node
// scripts/soak-failover.mjs — many seeds of the random-instant failover check (replication.md §7 B.2).
//
// Runs test/pair/two-daemons-random.test.ts with BLKREP_SOAK_SEEDS set, a batch of seeds per vitest
// run, and prints the seeds run and every failing seed with its message (the message names the
// seed's writes, checkpoint interval and kill instant; rerun one with --seeds N).
//
//   scripts/soak-failover.mjs [--from 1000] [--count 100] [--seeds 5,9,20-30] [--batch 10] [--minutes M] [--json] [--test FILE]
//
// --test runs another seeded test file the same way (BLKREP_SOAK_SEEDS, titles "seed N: …"):
// test/pair/attack-restart-crash-seeds.test.ts kills the secondary at a checkpoint step under writes.
//
// --minutes stops starting new batches after M minutes. Exit status: 0 no failure, 1 a seed failed,
// 2 usage error. Needs a built blkrep (npm run build). Each seed runs two daemons (~10 s).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const TEST = opt('test', 'test/pair/two-daemons-random.test.ts');
const usage = (msg) => {
  process.stderr.write(`soak-failover: ${msg}\nusage: scripts/soak-failover.mjs [--from N] [--count N] [--seeds LIST] [--batch N] [--minutes M] [--json] [--test FILE]\n`);
  process.exit(2);
};
const int = (name, dflt) => {
  const v = opt(name, dflt);
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(String(v)) || Number(v) < 1) usage(`--${name} must be a positive integer, not "${v}"`);
  return Number(v);
};
if (args.includes('--help') || args.includes('-h')) {
  process.stdout.write(readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1).filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n') + '\n');
  process.exit(0);
}

let seeds;
const list = opt('seeds');
if (list !== undefined) {
  seeds = [];
  for (const part of list.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m) usage(`--seeds: "${part}" is not a seed or a range a-b`);
    for (let s = Number(m[1]); s <= Number(m[2] ?? m[1]); s++) seeds.push(s);
  }
} else {
  const from = int('from', '1000');
  const count = int('count', '100');
  seeds = Array.from({ length: count }, (_, i) => from + i);
}
const batch = int('batch', '10');
const minutes = opt('minutes') === undefined ? Infinity : int('minutes');
const JSON_OUT = args.includes('--json');

const t0 = Date.now();
const out = mkdtempSync(path.join(tmpdir(), 'blkrep-soak-'));
const ran = [];
const failures = [];
try {
  for (let i = 0; i < seeds.length; i += batch) {
    if (Date.now() - t0 > minutes * 60_000) break;
    const some = seeds.slice(i, i + batch);
    const report = path.join(out, `batch-${i}.json`);
    process.stderr.write(`seeds ${some[0]}…${some[some.length - 1]} (${ran.length} run, ${failures.length} failed so far)\n`);
    const r = spawnSync('npx', ['vitest', 'run', TEST, '--reporter=json', `--outputFile=${report}`], {
      cwd: root,
      env: { ...process.env, BLKREP_SOAK_SEEDS: some.join(',') },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    let results;
    try {
      results = JSON.parse(readFileSync(report, 'utf8'));
    } catch {
      process.stderr.write(`soak-failover: vitest wrote no report (exit ${r.status}); stopping\n`);
      failures.push({ seed: some.join(','), message: `vitest exited ${r.status} without a report` });
      break;
    }
    for (const file of results.testResults) {
      for (const t of file.assertionResults) {
        const seed = Number(/seed (\d+)/.exec(t.title)?.[1]);
        ran.push(seed);
        if (t.status !== 'passed') failures.push({ seed, title: t.title, message: (t.failureMessages ?? []).join('\n').split('\n').slice(0, 12).join('\n') });
      }
    }
  }
} finally {
  rmSync(out, { recursive: true, force: true });
}

const seconds = Math.round((Date.now() - t0) / 1000);
if (JSON_OUT) {
  console.log(JSON.stringify({ seedsRun: ran.length, seeds: ran, failures, seconds }));
} else {
  // a daemon that did not start in time (a loaded machine) is not a failover finding
  const startup = failures.filter((f) => /listening line|before listening/.test(f.message)).length;
  console.log(`${path.basename(TEST)} soak: ${ran.length} seeds run (${ran.length ? `${Math.min(...ran)}–${Math.max(...ran)}` : 'none'}) in ${seconds} s, ${failures.length} failed (${startup} of them a daemon that did not start)`);
  for (const f of failures) console.log(`\nseed ${f.seed}: ${f.title ?? ''}\n${f.message}`);
}
process.exit(failures.length ? 1 : 0);
