/**
 * What the heartbeat tests with real daemons share: free ports, the pair key, sparse images, a
 * fence hook, event watching, a primary/secondary pair beating over udp, and one whose pair link
 * runs through a proxy a test cuts.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { controlRequest, firstCheckpoint, sparseImages } from './control.js';
/** sparse raw images (test/support/control.ts), for the heartbeat tests that import them from here */
export { sparseImages };
import { makeTempDir, run, serve, start, unixUri, waitFor, type Served, type Started } from './spawn.js';

export async function freeTcpPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

export async function freeUdpPort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  const port = s.address().port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

/** DIR/pair.key, 32 bytes, mode 0600 */
export async function pairKey(dir: string, name = 'pair.key', text = 'a pair key of thirty-two bytes!!'): Promise<string> {
  const key = join(dir, name);
  await writeFile(key, text);
  await chmod(key, 0o600);
  return key;
}

/** A fence hook exiting `exit` (DRBD's codes), appending "NODE fenced PEER" to `log` when given. */
export async function fenceHook(dir: string, exit: number, log?: string, name = 'fence.sh'): Promise<string> {
  const hook = join(dir, name);
  await writeFile(hook, `#!/bin/sh\n${log ? `echo "$BLKREP_NODE fenced $BLKREP_PEER" >> ${log}\n` : ''}exit ${exit}\n`);
  await chmod(hook, 0o700);
  return hook;
}

export interface Watched {
  events: Array<ControlEvent & { at: number }>;
  client: ControlClient;
}

/** Subscribe to a daemon's events, each stamped with its arrival on this process's monotonic clock. */
export async function watch(control: string, events: string[]): Promise<Watched> {
  const client = await ControlClient.connect(control, { timeoutMs: 10_000 });
  const seen: Watched['events'] = [];
  await client.subscribe(events, (e) => seen.push({ ...e, at: performance.now() }));
  return { events: seen, client };
}

export interface HeartbeatPair {
  dir: string;
  p: Served;
  s: Served;
  pCtl: string;
  sCtl: string;
  pSock: string;
  sSock: string;
  /** serve-nbd's arguments for each, to start one again */
  pArgs: string[];
  sArgs: string[];
}

export interface HeartbeatPairOptions {
  size: number;
  /** flags of both, after the key and the udp path (default: --heartbeat-interval 0.1 --heartbeat-misses 5) */
  beat?: string[];
  /** extra flags of each */
  p?: string[];
  s?: string[];
}

/** The files and serve-nbd arguments of startHeartbeatPair's pair, nothing started (DIR made, its disks and key written). */
export async function heartbeatPairArgs(o: HeartbeatPairOptions & { autoFailover?: { fenceExit: number }; viaProxy?: boolean }): Promise<Omit<HeartbeatPair, 'p' | 's'> & { xSock: string }> {
  const dir = await makeTempDir();
  await sparseImages(dir, o.size);
  const key = await pairKey(dir);
  const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
  const beat = ['--heartbeat-key', key, ...(o.beat ?? ['--heartbeat-interval', '0.1', '--heartbeat-misses', '5'])];
  const [sSock, pSock, sCtl, pCtl, xSock] = ['s.sock', 'p.sock', 's.ctl', 'p.ctl', 'x.sock'].map((f) => join(dir, f)) as [string, string, string, string, string];
  // the secondary takes over by itself, fencing by DIR/fence.sh (which exits with fenceExit)
  const auto = o.autoFailover ? ['--auto-failover', '--fence-hook', await fenceHook(dir, o.autoFailover.fenceExit)] : [];
  const sArgs = [join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}`, ...beat, ...auto, ...(o.s ?? [])];
  const pArgs = [join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(o.viaProxy ? xSock : sSock), '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`, ...beat, ...(o.p ?? [])];
  return { dir, sArgs, pArgs, sSock, pSock, sCtl, pCtl, xSock };
}

/**
 * A pair: "beta" (--secondary) and "alpha" (--replicate-to beta), each on DIR/{p,s}.img, one udp
 * heartbeat path on 127.0.0.1, signed with DIR/pair.key. Resolves once checkpoint 1 is taken and
 * both hear each other.
 */
export async function startHeartbeatPair(o: HeartbeatPairOptions): Promise<HeartbeatPair> {
  const { dir, sArgs, pArgs, sSock, pSock, sCtl, pCtl } = await heartbeatPairArgs(o);
  const s = await serve(sArgs);
  const p = await serve(pArgs);
  await firstCheckpoint(pCtl);
  const hbState = async (ctl: string): Promise<string> => (await controlRequest<{ heartbeat: { state: string } }>(ctl, 'status')).heartbeat.state;
  await waitFor(async () => (await hbState(sCtl)) === 'alive' && (await hbState(pCtl)) === 'alive', 'both to hear each other');
  return { dir, p, s, pCtl, sCtl, pSock, sSock, pArgs, sArgs };
}

export interface LinkCutPair extends HeartbeatPair {
  /** the pair link's proxy (DIR/x.sock → the secondary's socket): kill it -9 to cut the link */
  x: Started;
  /** the secondary's events named in `events` */
  ws: Watched;
  pUri: string;
  /** the secondary's disk at checkpoint 2 (0x11 in the first 64 KiB) */
  cp2: Buffer;
  /** stops the watcher and the three processes (this.p as it is then: a test may start it again) */
  stop(): Promise<void>;
}

/**
 * The pair of the link-cut attacks: a sync pair as startHeartbeatPair's, with the secondary taking
 * over by itself (fence hook exit 7) and the pair link through a proxy process a test kills -9
 * while the heartbeat goes on. Resolves at checkpoint 2, after 0x11 is written to the first 64 KiB.
 */
export async function startLinkCutPair(o: HeartbeatPairOptions & { events: string[] }): Promise<LinkCutPair> {
  const a = await heartbeatPairArgs({ ...o, p: ['--protocol', 'sync', ...(o.p ?? [])], autoFailover: { fenceExit: 7 }, viaProxy: true });
  const s = await serve(a.sArgs);
  const x = await unixProxy(a.dir, a.xSock, a.sSock);
  const p = await serve(a.pArgs);
  const ws = await watch(a.sCtl, o.events);
  const pair: LinkCutPair = {
    ...a, s, x, p, ws, pUri: unixUri(a.pSock), cp2: Buffer.alloc(0),
    async stop() {
      await ws.client.close();
      for (const proc of [this.p, x, s]) await proc.stop('SIGKILL').catch(() => {});
    },
  };
  try {
    await firstCheckpoint(a.pCtl);
    const w = await run('qemu-io', ['-f', 'raw', pair.pUri, '-c', 'write -P 0x11 0 64k']);
    if (w.code !== 0) throw new Error(`qemu-io write 0x11: exit ${w.code}: ${w.stderr}`);
    const cp = await controlRequest<{ epoch: number }>(a.pCtl, 'checkpoint');
    if (cp.epoch !== 2) throw new Error(`checkpoint after 0x11 gave epoch ${cp.epoch}, expected 2`);
    pair.cp2 = await readFile(join(a.dir, 's.img'));
    return pair;
  } catch (e) {
    await pair.stop();
    throw e;
  }
}

/** A Unix-socket proxy in its own process: LISTEN → TARGET, prints "ready" once listening. */
const PROXY = `
const net = require('node:net');
const [listen, target] = process.argv.slice(2);
net.createServer((c) => {
  const t = net.connect(target);
  c.pipe(t); t.pipe(c);
  c.on('error', () => t.destroy()); t.on('error', () => c.destroy());
  c.on('close', () => t.destroy()); t.on('close', () => c.destroy());
}).listen(listen, () => console.log('ready'));
`;

/**
 * A proxy process from the Unix socket `listen` to `target` (a pair link a test cuts with kill -9
 * while the heartbeat goes on); its script is written in `dir`. Resolves once it listens.
 */
export async function unixProxy(dir: string, listen: string, target: string): Promise<Started> {
  const script = join(dir, 'proxy.cjs');
  await writeFile(script, PROXY);
  const p = start(process.execPath, [script, listen, target]);
  await waitFor(() => p.stdout().includes('ready') || (p.child.exitCode !== null && Promise.reject(new Error(`proxy exited: ${p.stderr()}`))), 'the proxy to listen');
  return p;
}
