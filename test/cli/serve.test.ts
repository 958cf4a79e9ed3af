/**
 * `blkrep serve-nbd` as a process: the --json listening/stopped lines, the embedded default over
 * TCP, durability against kill -9 (A.15 items 26, 27, 34), SIGTERM/SIGINT with work in flight,
 * the pid file, the control socket and `blkrep status`, the errors a user can hit, --shared.
 *
 * Everything runs the built CLI (node bin/run.js) through test/support/spawn.ts. Waits are
 * conditions with deadlines; nothing here asserts on timing.
 */
import { existsSync } from 'node:fs';
import { readFile, stat, truncate, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/constants.js';
import { RawClient, replyError } from '../support/raw-client.js';
import {
  hasTool, makeTempDir, run, runCli, serve, start, unixUri, waitFor, withTimeout, type Served, type Started,
} from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const ESHUTDOWN = 108;

// -------------------------------------------------------------------------------------------------
// helpers

/** One request on the control socket, one reply line back (bounded). */
async function control(path: string, request: object, timeoutMs = 10_000): Promise<{ id: unknown; ok: boolean; result?: unknown; error?: { code: string; message: string } }> {
  const socket = net.createConnection(path);
  socket.on('error', () => {});
  try {
    const line = await withTimeout(
      new Promise<string>((resolve, reject) => {
        let buf = '';
        socket.setEncoding('utf8');
        socket.on('data', (s: string) => {
          buf += s;
          const nl = buf.indexOf('\n');
          if (nl >= 0) resolve(buf.slice(0, nl));
        });
        socket.once('error', reject);
        socket.once('close', () => reject(new Error(`control socket ${path} closed before replying (got "${buf}")`)));
        socket.once('connect', () => socket.write(`${JSON.stringify(request)}\n`));
      }),
      timeoutMs,
      `a reply on ${path} to ${JSON.stringify(request)}`,
    );
    return JSON.parse(line);
  } finally {
    socket.destroy();
  }
}

interface ExportStatus {
  name: string;
  image: string;
  size: number;
  readOnly: boolean;
  connections: number;
  totalConnections: number;
  requests: Record<string, number>;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}
interface Status {
  pid: number;
  shuttingDown: boolean;
  connections: Array<{ id: number; peer: string; export: string | null; state: string; inFlight: number; requests: number }>;
  exports: ExportStatus[];
  listeners: Array<{ address: string }>;
  control: string | null;
}

async function status(path: string): Promise<Status> {
  const r = await control(path, { cmd: 'status' });
  if (!r.ok) throw new Error(`status failed: ${JSON.stringify(r.error)}`);
  return r.result as Status;
}

/** A file of `size` bytes, all zero (sparse). */
async function zeroFile(path: string, size: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, size);
}

const PROMPT = 'qemu-io> ';

function countPrompts(out: string): number {
  return out.split(PROMPT).length - 1;
}

/**
 * qemu-io kept running on `uri`, fed one command at a time: it reads stdin line by line from its
 * main loop, so a command is sent only after the prompt that ends the previous one (commands
 * written together would sit in its stdin buffer).
 */
function qemuIoSession(uri: string): Started & { command(cmd: string): Promise<string> } {
  const p = start('qemu-io', ['-f', 'raw', uri]);
  let queue = Promise.resolve('');
  const command = (cmd: string): Promise<string> => {
    queue = queue.then(async () => {
      await waitFor(() => countPrompts(p.stdout()) >= 1 || p.child.exitCode !== null, 'the qemu-io prompt', { timeoutMs: 15_000 });
      const before = p.stdout().length;
      const prompts = countPrompts(p.stdout());
      p.child.stdin!.write(`${cmd}\n`);
      await waitFor(() => countPrompts(p.stdout()) > prompts, `qemu-io to finish "${cmd}" (stdout: ${p.stdout()}, stderr: ${p.stderr()})`, { timeoutMs: 15_000 });
      return p.stdout().slice(before);
    });
    return queue;
  };
  return Object.assign(p, { command });
}

/** A port nobody listens on right now (bind 0, read it, close). */
async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as net.AddressInfo;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

function connectable(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

const hasQemuIo = hasTool('qemu-io');
const hasNbdinfo = hasTool('nbdinfo');

// -------------------------------------------------------------------------------------------------

describe('serve-nbd --json lines', () => {
  it('prints exactly {"event":"listening","uris":[...],"pid":N}, then {"event":"stopped","pid":N} on SIGTERM', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const s = await serve(['memory:16M', '--socket', sock, '--export', 'two=memory:1M']);
    expect(s.listeningLine).toMatch(/^\{"event":"listening","uris":\[[^\]]*\],"pid":\d+\}$/);
    const event = JSON.parse(s.listeningLine) as Record<string, unknown>;
    expect(Object.keys(event)).toEqual(['event', 'uris', 'pid']);
    expect(event.pid).toBe(s.pid);
    expect(s.uris).toEqual([unixUri(sock), unixUri(sock, 'two')]);
    expect(s.stdout()).toBe(`${s.listeningLine}\n`);
    expect(await s.stop('SIGTERM')).toBe(0);
    expect(s.stdout()).toBe(`${s.listeningLine}\n{"event":"stopped","pid":${s.pid}}\n`);
    // the unix listener removes its socket file at exit
    expect(existsSync(sock)).toBe(false);
  });

  it.skipIf(!hasNbdinfo)('with no image serves the 1 GiB in-memory default as export "" over TCP (--port 0 reports the real port)', async () => {
    const s = await serve(['--port', '0']);
    expect(s.uris).toHaveLength(1);
    const m = /^nbd:\/\/127\.0\.0\.1:(\d+)\/$/.exec(s.uris[0]!);
    expect(m, s.uris[0]).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThan(0);
    const info = await run('nbdinfo', ['--json', s.uris[0]!], { timeoutMs: 15_000 });
    expect(info.code, info.stderr).toBe(0);
    const e = (JSON.parse(info.stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
    expect(e['export-size']).toBe(1073741824);
    expect(e['export-name']).toBe('');
    expect(e.is_read_only).toBe(false);
  });

  it.skipIf(!hasNbdinfo)('--port N with a free port, together with --socket: one URI per listener', async () => {
    const port = await freePort();
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const s = await serve(['--socket', sock, '--port', String(port)]);
    expect(s.uris).toEqual([unixUri(sock), `nbd://127.0.0.1:${port}/`]);
    for (const uri of s.uris) {
      const size = await run('nbdinfo', ['--size', uri], { timeoutMs: 15_000 });
      expect(size.code, size.stderr).toBe(0);
      expect(size.stdout.trim()).toBe('1073741824');
    }
  });
});

describe.skipIf(!hasQemuIo)('durability: acknowledged data survives kill -9 of the server', () => {
  async function servedFile(): Promise<{ image: string; sock: string; s: Served }> {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.raw');
    await zeroFile(image, 8 * MiB);
    const sock = join(dir, 's.sock');
    const s = await serve([image, '--socket', sock]);
    return { image, sock, s };
  }

  async function kill9(s: Served): Promise<void> {
    process.kill(s.pid, 'SIGKILL');
    const exit = await s.waitExit(10_000);
    expect(exit.signal).toBe('SIGKILL');
  }

  it('writes covered by a FLUSH reply (client still connected)', async () => {
    const { image, sock, s } = await servedFile();
    const q = qemuIoSession(unixUri(sock));
    expect(await q.command('write -P 0x5a 0 1M')).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(await q.command('write -P 0x5b 1048577 4095')).toContain('wrote 4095/4095 bytes at offset 1048577'); // unaligned, too
    // the prompt after "flush" means the FLUSH reply arrived
    expect(await q.command('flush')).toBe(PROMPT);
    expect(q.stdout()).not.toMatch(/fail|error/i);
    await kill9(s);
    const data = await readFile(image);
    expect(data.subarray(0, MiB).every((b) => b === 0x5a)).toBe(true);
    expect(data[MiB]).toBe(0);
    expect(data.subarray(MiB + 1, MiB + 4096).every((b) => b === 0x5b)).toBe(true);
    expect(data.subarray(MiB + 4096).every((b) => b === 0)).toBe(true);
  });

  it('FUA writes (write -f), acknowledged and nothing after them', async () => {
    const { image, sock, s } = await servedFile();
    const q = qemuIoSession(unixUri(sock));
    expect(await q.command('write -f -P 0x6b 2M 1M')).toContain('wrote 1048576/1048576 bytes at offset 2097152');
    expect(await q.command('write -f -P 0x6c 4M 4k')).toContain('wrote 4096/4096 bytes at offset 4194304');
    await kill9(s);
    const data = await readFile(image);
    expect(data.subarray(2 * MiB, 3 * MiB).every((b) => b === 0x6b)).toBe(true);
    expect(data.subarray(4 * MiB, 4 * MiB + 4 * KiB).every((b) => b === 0x6c)).toBe(true);
  });

  it('writes before DISC (qemu-io exiting), then the server restarts on its stale socket and serves them', async () => {
    const { image, sock, s } = await servedFile();
    const r = await run('qemu-io', ['-f', 'raw', unixUri(sock), '-c', 'write -P 0x7c 6M 1M', '-c', 'aio_write -P 0x7d 7M 512k', '-c', 'aio_flush'], { timeoutMs: 15_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    await kill9(s);
    const data = await readFile(image);
    expect(data.subarray(6 * MiB, 7 * MiB).every((b) => b === 0x7c)).toBe(true);
    expect(data.subarray(7 * MiB, 7 * MiB + 512 * KiB).every((b) => b === 0x7d)).toBe(true);
    // the killed server left its socket file; a new one replaces it and serves the same data
    expect(existsSync(sock)).toBe(true);
    await serve([image, '--socket', sock]);
    const again = await run('qemu-io', ['-f', 'raw', unixUri(sock), '-c', 'read -P 0x7c 6M 1M', '-c', 'read -P 0x7d 7M 512k'], { timeoutMs: 15_000 });
    expect(again.code, again.stdout + again.stderr).toBe(0);
    expect(again.stdout).not.toMatch(/fail/i);
  });
});

describe('signals', () => {
  it.skipIf(!hasTool('fio'))('SIGTERM with fio mid-workload: stops accepting, exits 0, pid file written then removed', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.raw');
    await zeroFile(image, 64 * MiB);
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'ctl.sock');
    const pidFile = join(dir, 'serve.pid');
    const s = await serve([image, '--socket', sock, '--control', ctl, '--pid-file', pidFile]);
    expect(await readFile(pidFile, 'utf8')).toBe(`${s.pid}\n`);

    const fio = start('fio', [
      '--name=load', '--ioengine=nbd', `--uri=${unixUri(sock)}`, '--rw=randwrite', '--bs=64k', '--iodepth=32',
      '--size=64M', '--time_based', '--runtime=60',
    ]);
    await waitFor(async () => (await status(ctl)).exports[0]!.bytesWritten >= 8 * MiB, 'fio to be writing', { timeoutMs: 20_000 });
    expect(await s.stop('SIGTERM', 20_000)).toBe(0);
    expect(s.stderr()).toContain('SIGTERM: finishing requests in flight');
    expect(s.stdout().trim().split('\n').at(-1)).toBe(`{"event":"stopped","pid":${s.pid}}`);
    expect(existsSync(pidFile)).toBe(false);
    expect(existsSync(sock)).toBe(false);
    expect(existsSync(ctl)).toBe(false);
    expect(await connectable(sock)).toBe(false);
    // fio loses its server and stops on its own, well before its 60 s runtime
    const fioExit = await fio.waitExit(30_000);
    expect(fioExit.signal).toBeNull();
  });

  it('SIGINT during a burst of pipelined writes: every answer is success or ESHUTDOWN, every acknowledged write is in the file, exit 0', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.raw');
    const SIZE = 64 * MiB;
    await zeroFile(image, SIZE);
    const sock = join(dir, 's.sock');
    const s = await serve([image, '--socket', sock]);
    const { client } = await RawClient.open(sock, { structured: true });
    const N = 128;
    const LEN = 256 * KiB;
    const cookies: bigint[] = [];
    for (let i = 0; i < N; i++) cookies.push(client.send(CMD.WRITE, { offset: i * LEN, data: Buffer.alloc(LEN, (i % 255) + 1) }));
    // once the first reply is back, the server is working through the rest
    const first = await client.readReply(undefined, 15_000);
    process.kill(s.pid, 'SIGINT');
    const replies = [first];
    for (;;) {
      try {
        replies.push(await client.readReply(undefined, 15_000));
      } catch {
        break; // EOF: the server closed the connection after the last answer
      }
    }
    client.destroy();
    expect((await s.waitExit(20_000)).code).toBe(0);
    expect(s.stderr()).toContain('SIGINT: finishing requests in flight');

    const data = await readFile(image);
    const done = new Set<bigint>();
    for (const r of replies) {
      const err = replyError(r);
      expect([0, ESHUTDOWN]).toContain(err);
      if (err === 0) done.add(r.cookie);
    }
    expect(done.size).toBeGreaterThanOrEqual(1);
    for (let i = 0; i < N; i++) {
      const slice = data.subarray(i * LEN, (i + 1) * LEN);
      if (done.has(cookies[i]!)) expect(slice.every((b) => b === (i % 255) + 1), `write ${i} was acknowledged`).toBe(true);
    }
  });

  it('a second signal while shutting down exits 1 at once; the pid file is removed', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const pidFile = join(dir, 'serve.pid');
    const s = await serve(['memory:16M', '--socket', sock, '--pid-file', pidFile, '--handshake-timeout', '120']);
    // a client stuck in the handshake holds the shutdown until its handshake timer runs out
    const stuck = await RawClient.connect(sock);
    await stuck.readGreeting();
    process.kill(s.pid, 'SIGTERM');
    // the first signal closed the listener (no new connections), but the process keeps running
    await waitFor(() => !existsSync(sock), 'the listener to close after SIGTERM');
    expect(await connectable(sock)).toBe(false);
    expect(s.child.exitCode).toBeNull();
    expect(await s.stop('SIGTERM', 10_000)).toBe(1);
    expect(s.stderr()).toMatch(/SIGTERM again: exiting without waiting/);
    expect(existsSync(pidFile)).toBe(false);
    stuck.destroy();
  });
});

describe('control socket and blkrep status', () => {
  it.skipIf(!hasQemuIo)('mode 0600; status --json counts connections and bytes; the text output names the export', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.raw');
    await zeroFile(image, 8 * MiB);
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'ctl.sock');
    await serve(['--export', `vol1=${image}`, '--socket', sock, '--control', ctl]);
    expect((await stat(ctl)).mode & 0o777).toBe(0o600);

    const idle = await runCli(['status', '--control', ctl, '--json']);
    expect(idle.code, idle.stderr).toBe(0);
    const s0 = JSON.parse(idle.stdout) as Status;
    expect(s0.exports).toHaveLength(1);
    expect(s0.exports[0]).toMatchObject({ name: 'vol1', image, size: 8 * MiB, readOnly: false, connections: 0, bytesWritten: 0, bytesRead: 0 });
    expect(s0.connections).toEqual([]);
    expect(s0.control).toBe(ctl);

    // a client connected: listed in connections
    const q = qemuIoSession(unixUri(sock, 'vol1'));
    expect(await q.command('write -P 0x11 0 1M')).toContain('wrote 1048576/1048576');
    expect(await q.command('write -P 0x22 2M 64k')).toContain('wrote 65536/65536');
    expect(await q.command('read -P 0x11 0 4k')).toContain('read 4096/4096');
    const live = JSON.parse((await runCli(['status', '--control', ctl, '--json'])).stdout) as Status;
    expect(live.connections).toHaveLength(1);
    expect(live.connections[0]).toMatchObject({ export: 'vol1', state: 'transmission' });
    const e = live.exports[0]!;
    expect(e.connections).toBe(1);
    expect(e.bytesWritten).toBe(MiB + 64 * KiB);
    expect(e.requests.write).toBe(2);
    expect(e.bytesRead).toBeGreaterThanOrEqual(4 * KiB);
    expect(e.requests.read).toBeGreaterThanOrEqual(1);

    const text = await runCli(['status', '--control', ctl]);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain('"vol1"');
    expect(text.stdout).toContain(image);
    expect(text.stdout).toMatch(/Connections: 1/);

    q.child.stdin!.end(); // qemu-io exits: DISC
    await q.waitExit(15_000);
    await waitFor(async () => (await status(ctl)).connections.length === 0, 'the connection to close');
    const after = (await status(ctl)).exports[0]!;
    expect(after.totalConnections).toBe(1);
    expect(after.connections).toBe(0);
    expect(after.requests.disc).toBe(1); // qemu-io says goodbye with NBD_CMD_DISC
    expect(after.bytesWritten).toBe(MiB + 64 * KiB);
  });

  it('{"cmd":"shutdown"} stops the daemon: reply, then exit 0, pid file and sockets removed', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'ctl.sock');
    const pidFile = join(dir, 'serve.pid');
    const s = await serve(['memory:4M', '--socket', sock, '--control', ctl, '--pid-file', pidFile]);
    const reply = await control(ctl, { id: 7, cmd: 'shutdown' });
    expect(reply).toEqual({ id: 7, ok: true, result: { stopping: true } });
    expect((await s.waitExit(20_000)).code).toBe(0);
    expect(s.stdout().trim().split('\n').at(-1)).toBe(`{"event":"stopped","pid":${s.pid}}`);
    expect(existsSync(pidFile)).toBe(false);
    expect(existsSync(ctl)).toBe(false);
    expect(existsSync(sock)).toBe(false);
  });

  it('an unknown control command is answered with an error naming the known ones', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'ctl.sock');
    await serve(['memory:4M', '--socket', join(dir, 's.sock'), '--control', ctl]);
    const r = await control(ctl, { cmd: 'no-such-command' });
    expect(r.ok).toBe(false);
    expect(r.error!.code).toBe('ERR_UNKNOWN_COMMAND');
    expect(r.error!.message).toMatch(/status/);
  });
});

describe('errors a user can hit', () => {
  interface Case {
    name: string;
    args: (dir: string) => string[];
    code: number;
    jsonCode?: string;
    message: (dir: string) => RegExp | string;
    /** must not match (e.g. a message saying the same thing twice) */
    notMessage?: RegExp;
    /** prepare the temp dir before running */
    setup?: (dir: string) => Promise<void>;
  }
  let heldPort = 0;
  const cases: Case[] = [
    {
      name: 'missing image file',
      args: (d) => ['serve-nbd', join(d, 'missing.raw'), '--socket', join(d, 's.sock')],
      code: 1,
      jsonCode: 'ERR_OPEN',
      message: (d) => join(d, 'missing.raw'),
    },
    {
      name: '--export without =',
      args: (d) => ['serve-nbd', '--export', 'diskimg', '--socket', join(d, 's.sock')],
      code: 2,
      jsonCode: 'ERR_USAGE',
      message: () => /--export "diskimg" is not NAME=IMAGE/,
    },
    {
      name: 'duplicate export names',
      args: (d) => ['serve-nbd', '--export', 'a=memory:1M', '--export', 'a=memory:2M', '--socket', join(d, 's.sock')],
      code: 2,
      jsonCode: 'ERR_USAGE',
      message: () => /export "a" is given twice/,
    },
    {
      name: 'port already in use',
      args: () => ['serve-nbd', 'memory:1M', '--port', String(heldPort)],
      code: 1,
      jsonCode: 'ERR_ADDRESS_IN_USE',
      message: () => new RegExp(`127\\.0\\.0\\.1:${heldPort}.*in use`),
      notMessage: /cannot listen[\s\S]*cannot listen/,
    },
    {
      name: 'unix socket path taken by a regular file',
      setup: (d) => writeFile(join(d, 'taken'), 'not a socket'),
      args: (d) => ['serve-nbd', 'memory:1M', '--socket', join(d, 'taken')],
      code: 1,
      jsonCode: 'ERR_ADDRESS_IN_USE',
      message: (d) => join(d, 'taken'),
      notMessage: /cannot listen[\s\S]*cannot listen/,
    },
    {
      name: '--min-block-size 3000',
      args: (d) => ['serve-nbd', 'memory:1M', '--min-block-size', '3000', '--socket', join(d, 's.sock')],
      code: 2,
      jsonCode: 'ERR_USAGE',
      message: () => /--min-block-size 3000 is not a power of two/,
    },
    {
      name: '--min-block-size abc',
      args: (d) => ['serve-nbd', 'memory:1M', '--min-block-size', 'abc', '--socket', join(d, 's.sock')],
      code: 2,
      message: () => /--min-block-size[\s\S]*"abc"/,
    },
    {
      name: 'unknown flag',
      args: (d) => ['serve-nbd', '--bogus-flag', '--socket', join(d, 's.sock')],
      code: 2,
      jsonCode: 'ERR_USAGE',
      message: () => /Nonexistent flag: --bogus-flag/,
    },
    {
      name: 'status --control /nonexistent',
      args: () => ['status', '--control', '/nonexistent/blkrep.sock'],
      code: 1,
      jsonCode: 'ERR_CONTROL_UNREACHABLE',
      message: () => '/nonexistent/blkrep.sock',
    },
  ];

  for (const c of cases) {
    it(`${c.name}: exit ${c.code}, message on stderr; with --json {"error":{code,message}} on stdout`, async () => {
      const dir = await makeTempDir();
      const holder = net.createServer();
      if (c.name === 'port already in use') {
        await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
        heldPort = (holder.address() as net.AddressInfo).port;
      }
      await c.setup?.(dir);
      try {
        const want = c.message(dir);
        const text = await runCli(c.args(dir), { timeoutMs: 15_000 });
        expect(text.code, text.stdout + text.stderr).toBe(c.code);
        expect(text.stdout).toBe('');
        if (typeof want === 'string') expect(text.stderr).toContain(want);
        else expect(text.stderr).toMatch(want);
        if (c.notMessage) expect(text.stderr).not.toMatch(c.notMessage);

        const json = await runCli([...c.args(dir), '--json'], { timeoutMs: 15_000 });
        expect(json.code, json.stdout + json.stderr).toBe(c.code);
        const lines = json.stdout.trim().split('\n');
        expect(lines, json.stdout).toHaveLength(1);
        const body = JSON.parse(lines[0]!) as { error: { code: string; message: string } };
        expect(Object.keys(body)).toEqual(['error']);
        expect(Object.keys(body.error).sort()).toEqual(['code', 'message']);
        expect(body.error.code).toMatch(/^ERR_[A-Z0-9_]+$/);
        if (c.jsonCode) expect(body.error.code).toBe(c.jsonCode);
        if (typeof want === 'string') expect(body.error.message).toContain(want);
        else expect(body.error.message).toMatch(want);
      } finally {
        if (holder.listening) await new Promise<void>((resolve) => holder.close(() => resolve()));
      }
    });
  }
});

describe.skipIf(!hasQemuIo || !hasNbdinfo)('--shared 1', () => {
  it('refuses a second simultaneous client while the first is connected, accepts it afterwards', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'ctl.sock');
    await serve(['memory:16M', '--socket', sock, '--shared', '1', '--control', ctl]);
    const q = qemuIoSession(unixUri(sock));
    expect(await q.command('write -P 0x42 0 4k')).toContain('wrote 4096/4096');
    expect((await status(ctl)).connections).toHaveLength(1);

    const second = await run('nbdinfo', ['--size', unixUri(sock)], { timeoutMs: 15_000 });
    expect(second.code).not.toBe(0);
    // the first client is unaffected
    const again = await q.command('read -P 0x42 0 4k');
    expect(again).toContain('read 4096/4096');
    expect(again).not.toMatch(/fail/i);

    q.child.stdin!.end();
    await q.waitExit(15_000);
    const later = await waitFor(
      async () => {
        const r = await run('nbdinfo', ['--size', unixUri(sock)], { timeoutMs: 15_000 });
        return r.code === 0 ? r : undefined;
      },
      'a new client to be accepted once the first has gone',
      { timeoutMs: 15_000, intervalMs: 100 },
    );
    expect(later.stdout.trim()).toBe(String(16 * MiB));
  });
});
