/**
 * serve-nbd --metrics: the daemon as a process, written and read by qemu-io over NBD, then
 * scraped with a real HTTP GET; the Prometheus text is parsed and the values compared with the
 * I/O done. Also: a Unix socket, a live mirror's job gauges, the errors a user can hit, and
 * --log-format json.
 */
import { request } from 'node:http';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, fstatSync, openSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatLogLine, isJournalStream } from '../../src/cli/log-format.js';
import { parseMetricsAddress } from '../../src/serve/metrics.js';
import { BIN, makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { emptyImage, rawImage } from '../jobs/live-helpers.js';

const MiB = 1024 * 1024;

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The Prometheus text format, the lines that are samples. */
function parse(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  return samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
}

/** GET over TCP (a URL) or a Unix socket (unix:PATH); status, content type and body. */
function get(where: string, path = '/metrics', method = 'GET'): Promise<{ status: number; type: string; body: string }> {
  const target = where.startsWith('unix:') ? { socketPath: where.slice(5), path } : { ...urlParts(where), path };
  return new Promise((resolve, reject) => {
    const req = request({ ...target, method, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (s: string) => (body += s));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer from ${where} within 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

function urlParts(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port) };
}

async function qemuIo(uri: string, ...commands: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri]);
  expect(r.code, r.stderr).toBe(0);
}

describe('serve-nbd --metrics', () => {
  it('counts what qemu-io wrote and read: requests, bytes, latency histogram, dirty bitmap bytes, connections; process metrics', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 'nbd');
    const d = await serve(['memory:64M', '--socket', sock, '--bitmap', 'b0', '--metrics', '127.0.0.1:0']);
    const listening = JSON.parse(d.listeningLine) as { metrics: string };
    expect(listening.metrics).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);

    await qemuIo(unixUri(sock), 'write -P 0x5a 1M 1M', 'write -P 0x5b 8M 64k', 'read -P 0x5a 1M 512k');
    const r = await get(listening.metrics);
    expect(r.status).toBe(200);
    expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
    const s = parse(r.body);
    const e = { export: '' };
    expect(value(s, 'blkrep_nbd_written_bytes_total', e)).toBe(MiB + 64 * 1024);
    expect(value(s, 'blkrep_nbd_read_bytes_total', e)).toBe(512 * 1024);
    const writes = value(s, 'blkrep_nbd_requests_total', { ...e, command: 'write' })!;
    expect(writes).toBeGreaterThanOrEqual(2);
    // every request answered is one observation in the histogram, by command
    expect(value(s, 'blkrep_nbd_request_duration_seconds_count', { ...e, command: 'write' })).toBe(writes);
    expect(value(s, 'blkrep_nbd_request_duration_seconds_count', { ...e, command: 'read' })).toBe(value(s, 'blkrep_nbd_requests_total', { ...e, command: 'read' }));
    expect(value(s, 'blkrep_nbd_request_duration_seconds_bucket', { ...e, command: 'write', le: '+Inf' })).toBe(writes);
    expect(value(s, 'blkrep_nbd_request_duration_seconds_sum', { ...e, command: 'write' })).toBeGreaterThan(0);
    expect(value(s, 'blkrep_nbd_errors_total', e)).toBe(0);
    // 1 MiB at 1M and 64 KiB at 8M, granularity 64 KiB
    expect(value(s, 'blkrep_bitmap_dirty_bytes', { export: '', bitmap: 'b0' })).toBe(MiB + 64 * 1024);
    expect(value(s, 'blkrep_nbd_connections_total', e)).toBe(1);
    expect(value(s, 'blkrep_nbd_connections', e)).toBe(0);
    expect(value(s, 'blkrep_export_size_bytes', e)).toBe(64 * MiB);
    expect(value(s, 'blkrep_nbd_buffer_limit_bytes')).toBe(256 * MiB);
    expect(value(s, 'process_cpu_seconds_total')).toBeGreaterThan(0);
    expect(value(s, 'process_resident_memory_bytes')).toBeGreaterThan(0);
    expect(r.body).toContain('# TYPE blkrep_nbd_requests_total counter');
    expect(r.body).toContain('# TYPE blkrep_nbd_request_duration_seconds histogram');

    // what the metrics are not: another path, another method
    expect((await get(listening.metrics, '/')).status).toBe(404);
    expect((await get(listening.metrics, '/metrics', 'POST')).status).toBe(405);
    expect((await get(listening.metrics, '/metrics', 'HEAD')).status).toBe(200);
    expect(await d.stop()).toBe(0);
  });

  it('serves on a Unix socket of mode 0600; a live mirror shows as job gauges', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await rawImage(src, 8 * MiB, 3);
    await emptyImage(dst, 8 * MiB);
    const msock = join(dir, 'metrics.sock');
    const ctl = join(dir, 'ctl');
    const d = await serve(['--export', `disk=${src}`, '--socket', join(dir, 'nbd'), '--control', ctl, '--metrics', `unix:${msock}`]);
    expect(JSON.parse(d.listeningLine).metrics).toBe(`unix:${msock}`);
    expect((await stat(msock)).mode & 0o777).toBe(0o600);

    const started = await runCli(['mirror', '--control', ctl, '--export', 'disk', dst, '--wait', 'ready', '--json']);
    expect(started.code, started.stderr).toBe(0);
    const s = parse((await get(`unix:${msock}`)).body);
    const job = { id: 'mirror0', type: 'mirror', export: 'disk' };
    expect(value(s, 'blkrep_job_length_bytes', job)).toBe(8 * MiB);
    expect(value(s, 'blkrep_job_offset_bytes', job)).toBe(8 * MiB);
    expect(s.filter((x) => x.name === 'blkrep_job_status' && x.labels.id === 'mirror0').map((x) => [x.labels.status, x.value])).toEqual([['ready', 1]]);
    expect(await d.stop()).toBe(0);
  });

  it('a primary replicating to qemu-nbd: link state, queue, bytes behind, epoch', async () => {
    const dir = await makeTempDir();
    const p = join(dir, 'p.img');
    const sImg = join(dir, 's.img');
    await emptyImage(p, 8 * MiB);
    await emptyImage(sImg, 8 * MiB);
    const ssock = join(dir, 's.sock');
    start('qemu-nbd', ['-f', 'raw', '-k', ssock, '--persistent', '--shared=4', sImg]);
    await waitFor(() => existsSync(ssock), `qemu-nbd listening on ${ssock}`);
    const d = await serve([p, '--socket', join(dir, 'p.sock'), '--replicate-to', unixUri(ssock), '--metrics', '127.0.0.1:0']);
    const url = JSON.parse(d.listeningLine).metrics as string;
    const links = async () => parse((await get(url)).body).filter((x) => x.name === 'blkrep_pair_link' && x.value === 1).map((x) => [x.labels.role, x.labels.state]);
    await waitFor(async () => (await links())[0]?.[1] === 'connected', 'the link to be connected in the metrics');
    await qemuIo(unixUri(join(dir, 'p.sock')), 'write -P 0x11 0 1M', 'flush');
    const s = parse((await get(url)).body);
    expect(await links()).toEqual([['primary', 'connected']]);
    // sync: a completed write is on both disks
    expect(value(s, 'blkrep_pair_queue_bytes', { export: '' })).toBe(0);
    expect(value(s, 'blkrep_pair_behind_bytes', { export: '' })).toBe(0);
    expect(value(s, 'blkrep_pair_epoch', { export: '' })).toBe(0);
    // a plain target takes no checkpoints: no age
    expect(value(s, 'blkrep_pair_checkpoint_age_seconds', { export: '' })).toBeUndefined();
    expect(await d.stop()).toBe(0);
  });

  it('refuses a bad address (exit 2, ERR_USAGE) and an address in use (exit 1, ERR_METRICS_LISTEN), opening nothing', async () => {
    const bads = ['10809', 'localhost:99999', 'unix:', 'host:port'];
    const results = await Promise.all(bads.map((bad) => runCli(['serve-nbd', 'memory:1M', '--port', '0', '--metrics', bad, '--json'])));
    for (const [i, r] of results.entries()) {
      expect(r.code, bads[i]).toBe(2);
      expect(JSON.parse(r.stdout).error.code).toBe('ERR_USAGE');
      expect(JSON.parse(r.stdout).error.message).toContain(`--metrics "${bads[i]}"`);
    }
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    try {
      const port = (busy.address() as { port: number }).port;
      const r = await runCli(['serve-nbd', 'memory:1M', '--port', '0', '--metrics', `127.0.0.1:${port}`, '--json']);
      expect(r.code).toBe(1);
      const err = JSON.parse(r.stdout).error;
      expect(err.code).toBe('ERR_METRICS_LISTEN');
      expect(err.message).toContain(`cannot serve metrics on 127.0.0.1:${port}`);
      expect(err.message).toContain('EADDRINUSE');
    } finally {
      busy.close();
    }
  });

  it('parses each form of address', () => {
    expect(parseMetricsAddress('0.0.0.0:9101')).toEqual({ kind: 'tcp', host: '0.0.0.0', port: 9101 });
    expect(parseMetricsAddress(':9101')).toEqual({ kind: 'tcp', host: '127.0.0.1', port: 9101 });
    expect(parseMetricsAddress('[::1]:9101')).toEqual({ kind: 'tcp', host: '::1', port: 9101 });
    expect(parseMetricsAddress('unix:/run/blkrep/m.sock')).toEqual({ kind: 'unix', path: '/run/blkrep/m.sock' });
    expect(() => parseMetricsAddress('::1:9101')).toThrow(expect.objectContaining({ code: 'ERR_USAGE' }));
  });
});

describe('serve-nbd --log-format', () => {
  it('json: every stderr line is one object with time, level, pid, message', async () => {
    const d = await serve(['memory:1M', '--port', '0', '--log-format', 'json', '--verbose']);
    await qemuIo(d.uris[0]!, 'read 0 4k');
    expect(await d.stop()).toBe(0);
    const lines = d.stderr().trim().split('\n');
    expect(lines.length).toBeGreaterThanOrEqual(2);
    for (const line of lines) {
      const o = JSON.parse(line) as Record<string, unknown>;
      expect(Object.keys(o)).toEqual(['time', 'level', 'pid', 'message']);
      expect(o.pid).toBe(d.pid);
      expect(['debug', 'info', 'warn']).toContain(o.level);
      expect(new Date(o.time as string).toISOString()).toBe(o.time);
    }
    expect(lines.map((l) => JSON.parse(l).message)).toContain('SIGTERM: finishing requests in flight, flushing, exiting');
  });

  it('text: an ISO 8601 time and the level first (under the journal: the <P> priority, no time); json escapes what would break a line', () => {
    const t = new Date('2026-01-02T03:04:05.678Z');
    expect(formatLogLine('text', 'warn', 'disk full', { now: t })).toBe('2026-01-02T03:04:05.678Z warn blkrep serve-nbd: disk full\n');
    expect(formatLogLine('text', 'info', 'listening', { now: t })).toBe('2026-01-02T03:04:05.678Z info blkrep serve-nbd: listening\n');
    expect(formatLogLine('text', 'warn', 'disk full', { now: t, journal: true })).toBe('<4>blkrep serve-nbd: disk full\n');
    expect(formatLogLine('text', 'debug', 'x', { journal: true })).toBe('<7>blkrep serve-nbd: x\n');
    expect(formatLogLine('json', 'info', 'x', { now: t, journal: true })).toBe(`{"time":"2026-01-02T03:04:05.678Z","level":"info","pid":${process.pid},"message":"x"}\n`);
    const line = formatLogLine('json', 'warn', 'a "quoted"\nname', { now: t });
    expect(line.split('\n')).toHaveLength(2);
    expect(JSON.parse(line)).toEqual({ time: '2026-01-02T03:04:05.678Z', level: 'warn', pid: process.pid, message: 'a "quoted"\nname' });
  });

  it('the journal is recognised by JOURNAL_STREAM = the device:inode of stderr, not by the variable alone', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'stderr.log');
    const fd = openSync(file, 'w');
    try {
      const st = fstatSync(fd);
      expect(isJournalStream(fd, { JOURNAL_STREAM: `${st.dev}:${st.ino}` })).toBe(true);
      expect(isJournalStream(fd, { JOURNAL_STREAM: `${st.dev}:${st.ino + 1}` })).toBe(false);
      expect(isJournalStream(fd, {})).toBe(false);
      expect(isJournalStream(fd, { JOURNAL_STREAM: 'garbage' })).toBe(false);
    } finally {
      closeSync(fd);
    }
  });

  it('the daemon\'s text lines carry the time and level: stderr a file, then the same file announced as the journal', async () => {
    const dir = await makeTempDir();
    for (const journal of [false, true]) {
      const file = join(dir, `stderr-${journal}.log`);
      const fd = openSync(file, 'w');
      const st = fstatSync(fd);
      const env = { ...process.env, JOURNAL_STREAM: journal ? `${st.dev}:${st.ino}` : '' };
      const child = spawn(process.execPath, [BIN, 'serve-nbd', 'memory:1M', '--socket', join(dir, `s-${journal}.sock`), '--json'], { stdio: ['ignore', 'pipe', fd], env });
      closeSync(fd);
      await new Promise<void>((done) => child.stdout!.once('data', () => done()));
      child.kill('SIGTERM');
      await new Promise((done) => child.once('exit', done));
      const lines = (await readFile(file, 'utf8')).trim().split('\n');
      const stop = lines.find((l) => l.endsWith('SIGTERM: finishing requests in flight, flushing, exiting'));
      expect(stop, lines.join('\n')).toBeDefined();
      if (journal) expect(stop).toBe('<6>blkrep serve-nbd: SIGTERM: finishing requests in flight, flushing, exiting');
      else expect(stop).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info blkrep serve-nbd: SIGTERM: finishing requests in flight, flushing, exiting$/);
    }
  });

  it('refuses another format (exit 2)', async () => {
    const r = await runCli(['serve-nbd', 'memory:1M', '--log-format', 'xml']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--log-format');
  });
});
