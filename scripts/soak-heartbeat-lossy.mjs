#!/usr/bin/env node
// scripts/soak-heartbeat-lossy.mjs — false failovers over a long lossy link (issue 12's figure:
// 30 minutes, aim 0).
//
// Two `bin/run.js serve-nbd` daemons (memory disks) beat to each other over udp on 127.0.0.1,
// signed with a pair key. Each --lossy path goes through a relay (in this process) that drops
// every datagram with probability --loss (seeded, both directions); each --clean path is direct.
// The script runs for --minutes and counts, on both daemons, the peer-suspect and peer-dead
// events (a peer-dead is what would start an automatic failover: a false failover), beats sent
// and received per path, and datagrams dropped. Exit 0 when there was no peer-dead, 1 otherwise.
//
//   scripts/soak-heartbeat-lossy.mjs [--minutes 30] [--loss 0.3] [--lossy 1] [--clean 1]
//        [--interval 0.5] [--misses 5] [--detector fixed|phi] [--phi-threshold 8] [--seed 1] [--json]
//
// Defaults: the daemon's defaults (0.5 s x 5, fixed), one lossy path beside one clean path (the
// issue's "30 % random loss on one path"). With --clean 0 the lossy path is the only one: then
// five datagrams lost in a row (p = 0.3^5 = 0.24 % per beat) declare the peer dead, about 8 times
// in 30 minutes at 2 beats/s, which is why a pair needs two paths. Needs a built blkrep.
import { spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(root, 'bin', 'run.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const MINUTES = Number(opt('minutes', '30'));
const LOSS = Number(opt('loss', '0.3'));
const LOSSY = Number(opt('lossy', '1'));
const CLEAN = Number(opt('clean', '1'));
const INTERVAL = opt('interval', '0.5');
const MISSES = opt('misses', '5');
const DETECTOR = opt('detector', 'fixed');
const PHI = opt('phi-threshold', '8');
const SEED = Number(opt('seed', '1'));
const JSON_OUT = args.includes('--json');
for (const [name, v, ok] of [['minutes', MINUTES, MINUTES > 0], ['loss', LOSS, LOSS >= 0 && LOSS < 1], ['lossy', LOSSY, Number.isInteger(LOSSY) && LOSSY >= 0], ['clean', CLEAN, Number.isInteger(CLEAN) && CLEAN >= 0 && LOSSY + CLEAN > 0]]) {
  if (!ok) {
    console.error(`soak-heartbeat-lossy: --${name} ${v} is out of range`);
    process.exit(2);
  }
}

const { ControlClient } = await import(pathToFileURL(path.join(root, 'dist/src/control/client.js')).href);
const { seededRandom } = await import(pathToFileURL(path.join(root, 'dist/src/block/filters/error.js')).href);

const dir = mkdtempSync(path.join(tmpdir(), 'blkrep-soak-hb-'));
const children = new Set();
const cleanup = () => {
  for (const c of children) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
};
process.on('exit', cleanup);
process.on('SIGINT', () => process.exit(130));
process.on('SIGTERM', () => process.exit(143));
const key = path.join(dir, 'pair.key');
writeFileSync(key, 'soak pair key, thirty-two bytes!');
chmodSync(key, 0o600);

async function freePort() {
  const s = dgram.createSocket('udp4');
  await new Promise((r) => s.bind(0, '127.0.0.1', r));
  const port = s.address().port;
  await new Promise((r) => s.close(r));
  return port;
}

async function relay(listen, target, random) {
  const sock = dgram.createSocket('udp4');
  const counts = { passed: 0, dropped: 0 };
  sock.on('message', (msg) => {
    if (random() < LOSS) counts.dropped++;
    else {
      counts.passed++;
      sock.send(msg, target, '127.0.0.1');
    }
  });
  await new Promise((r) => sock.bind(listen, '127.0.0.1', r));
  return { sock, counts };
}

function serve(argv) {
  const child = spawn(process.execPath, [BIN, 'serve-nbd', ...argv, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve-nbd did not listen in 60 s: ${err}`)), 60_000);
    child.stdout.on('data', (d) => {
      out += d;
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve(child);
      }
    });
    child.once('exit', (code) => reject(new Error(`serve-nbd exited ${code}: ${out}${err}`)));
  });
}

const random = seededRandom(SEED);
const aPaths = [];
const bPaths = [];
const relays = [];
for (let i = 0; i < LOSSY + CLEAN; i++) {
  const [la, lb] = [await freePort(), await freePort()];
  if (i < LOSSY) {
    const [ra, rb] = [await freePort(), await freePort()];
    relays.push(await relay(ra, lb, random), await relay(rb, la, random));
    aPaths.push('--heartbeat', `udp://127.0.0.1:${ra}?listen=127.0.0.1:${la}`);
    bPaths.push('--heartbeat', `udp://127.0.0.1:${rb}?listen=127.0.0.1:${lb}`);
  } else {
    aPaths.push('--heartbeat', `udp://127.0.0.1:${lb}?listen=127.0.0.1:${la}`);
    bPaths.push('--heartbeat', `udp://127.0.0.1:${la}?listen=127.0.0.1:${lb}`);
  }
}
const detector = ['--detector', DETECTOR, ...(DETECTOR === 'phi' ? ['--phi-threshold', PHI] : ['--heartbeat-misses', MISSES])];
const common = ['memory:1M', '--heartbeat-key', key, '--heartbeat-interval', INTERVAL, ...detector];
const ctl = { alpha: path.join(dir, 'a.ctl'), beta: path.join(dir, 'b.ctl') };
await serve([...common, '--socket', path.join(dir, 'a.sock'), '--control', ctl.alpha, '--node-id', 'alpha', '--peer-id', 'beta', ...aPaths]);
await serve([...common, '--socket', path.join(dir, 'b.sock'), '--control', ctl.beta, '--node-id', 'beta', '--peer-id', 'alpha', ...bPaths]);

const counts = { alpha: { 'peer-suspect': 0, 'peer-dead': 0, 'peer-alive': 0 }, beta: { 'peer-suspect': 0, 'peer-dead': 0, 'peer-alive': 0 } };
const deaths = [];
const clients = {};
for (const node of ['alpha', 'beta']) {
  const c = await ControlClient.connect(ctl[node], { timeoutMs: 10_000 });
  clients[node] = c;
  await c.subscribe(['peer-alive', 'peer-suspect', 'peer-dead'], (e) => {
    counts[node][e.event]++;
    if (e.event === 'peer-dead') deaths.push({ node, at: new Date().toISOString(), silentMs: e.silentMs });
  });
}
const started = Date.now();
const end = started + MINUTES * 60_000;
while (Date.now() < end) {
  await new Promise((r) => setTimeout(r, Math.min(60_000, end - Date.now())));
  if (!JSON_OUT) {
    const dropped = relays.reduce((n, r) => n + r.counts.dropped, 0);
    console.error(`${((Date.now() - started) / 60_000).toFixed(1)} min: peer-dead ${counts.alpha['peer-dead'] + counts.beta['peer-dead']}, peer-suspect ${counts.alpha['peer-suspect'] + counts.beta['peer-suspect']}, datagrams dropped ${dropped}`);
  }
}
const status = {};
for (const node of ['alpha', 'beta']) status[node] = (await clients[node].request('status')).heartbeat;
for (const c of Object.values(clients)) await c.close();
const out = {
  minutes: MINUTES,
  loss: LOSS,
  paths: { lossy: LOSSY, clean: CLEAN },
  detector: DETECTOR === 'phi' ? { kind: 'phi', intervalS: Number(INTERVAL), threshold: Number(PHI) } : { kind: 'fixed', intervalS: Number(INTERVAL), misses: Number(MISSES) },
  falseFailovers: counts.alpha['peer-dead'] + counts.beta['peer-dead'],
  events: counts,
  deaths,
  relay: { passed: relays.reduce((n, r) => n + r.counts.passed, 0), dropped: relays.reduce((n, r) => n + r.counts.dropped, 0) },
  beats: Object.fromEntries(Object.entries(status).map(([n, h]) => [n, { sent: h.sent, received: h.paths.map((p) => ({ uri: p.uri, beats: p.beats, state: p.state })) }])),
};
if (JSON_OUT) console.log(JSON.stringify(out));
else {
  console.log(`${MINUTES} min, ${LOSSY} lossy path(s) at ${LOSS * 100} % loss + ${CLEAN} clean, ${DETECTOR} ${DETECTOR === 'phi' ? `threshold ${PHI}` : `${INTERVAL} s x ${MISSES}`}:`);
  console.log(`  false failovers (peer-dead): ${out.falseFailovers}; peer-suspect: ${counts.alpha['peer-suspect'] + counts.beta['peer-suspect']}`);
  console.log(`  datagrams through the relays: ${out.relay.passed} passed, ${out.relay.dropped} dropped`);
  for (const [n, b] of Object.entries(out.beats)) console.log(`  ${n}: sent ${b.sent}; received ${b.received.map((p) => p.beats).join(' / ')} (per path)`);
}
process.exit(out.falseFailovers === 0 ? 0 : 1);
