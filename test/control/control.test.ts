import { lstat, mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BlkrepError, isAbortError } from '../../src/api/errors.js';
import { ControlClient } from '../../src/control/client.js';
import { type ControlEvent, LineSplitter, MAX_REQUEST_LINE_BYTES } from '../../src/control/protocol.js';
import { ControlServer } from '../../src/control/server.js';
import { waitFor, withTimeout } from '../support/spawn.js';

/** A client speaking raw lines, to send what ControlClient never would. */
class RawClient {
  private readonly queue: unknown[] = [];
  private readonly waiting: Array<(line: unknown) => void> = [];
  private readonly lines = new LineSplitter(64 << 20);
  readonly ended: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const line of this.lines.push(chunk).lines) {
        const message: unknown = JSON.parse(line);
        const waiter = this.waiting.shift();
        if (waiter) waiter(message);
        else this.queue.push(message);
      }
    });
    socket.on('error', () => {}); // EPIPE when the server hangs up on an oversized line
    this.ended = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path, () => resolve(new RawClient(socket)));
      socket.once('error', reject);
    });
  }

  send(text: string | Buffer): void {
    this.socket.write(text);
  }

  /** The next line the server sends, parsed. */
  next(): Promise<unknown> {
    if (this.queue.length > 0) return Promise.resolve(this.queue.shift());
    return new Promise((resolve) => this.waiting.push(resolve));
  }
}

/** A socket file with nobody behind it, as a killed daemon leaves. */
async function makeStaleSocket(path: string): Promise<void> {
  const server = net.createServer();
  const bound = `${path}.tmp`;
  await new Promise<void>((resolve) => server.listen(bound, resolve));
  // Moved away, the file outlives the server (which unlinks only the name it bound).
  await rename(bound, path);
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

describe('control socket', () => {
  let dir: string;
  let path: string;
  const cleanups: Array<() => unknown> = [];

  beforeEach(async () => {
    dir = await mkdtemp(join(os.tmpdir(), 'blkrep-control-'));
    path = join(dir, 'ctl.sock');
  });
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  async function startServer(): Promise<ControlServer> {
    const server = await ControlServer.listen(path);
    cleanups.push(() => server.close());
    return server;
  }

  async function client(): Promise<ControlClient> {
    const c = await ControlClient.connect(path);
    cleanups.push(() => c.close());
    return c;
  }

  async function raw(): Promise<RawClient> {
    const c = await RawClient.connect(path);
    cleanups.push(() => c.socket.destroy());
    return c;
  }

  describe('requests', () => {
    it('answers a request with its handler result', async () => {
      const server = await startServer();
      server.register('add', (args) => {
        const { a, b } = args as { a: number; b: number };
        return { sum: a + b };
      });
      server.register('later', async () => 'done');
      const c = await client();
      await expect(c.request('add', { a: 2, b: 3 })).resolves.toEqual({ sum: 5 });
      await expect(c.request('later')).resolves.toBe('done');
    });

    it('echoes a string or number id, and answers pipelined requests each by its id', async () => {
      const server = await startServer();
      server.register('echo', (args) => args);
      const r = await raw();
      r.send('{"id":"a","cmd":"echo","args":{"n":1}}\n{"id":2.5,"cmd":"echo","args":{"n":2}}\r\n{"cmd":"echo"}\n');
      const replies = [await r.next(), await r.next(), await r.next()];
      expect(replies).toContainEqual({ id: 'a', ok: true, result: { n: 1 } });
      expect(replies).toContainEqual({ id: 2.5, ok: true, result: { n: 2 } });
      expect(replies).toContainEqual({ id: null, ok: true, result: {} });
    });

    it('never echoes an id that is not a string or a number: id null and ERR_BAD_REQUEST, the command not run', async () => {
      const server = await startServer();
      let runs = 0;
      server.register('count', () => ++runs);
      const r = await raw();
      const deep = `${'['.repeat(3000)}${']'.repeat(3000)}`;
      for (const id of ['[2]', '{"a":1}', 'true', deep]) {
        r.send(`{"id":${id},"cmd":"count"}\n`);
        expect(await r.next()).toEqual({
          id: null,
          ok: false,
          error: { code: 'ERR_BAD_REQUEST', message: expect.stringMatching(/^"id" must be a string or a number, got (an array of 1|an object|true); the reply's id is null$/) },
        });
      }
      r.send('{"id":1,"cmd":"count"}\n');
      expect(await r.next()).toEqual({ id: 1, ok: true, result: 1 });
    });

    it('writes bigints in results as numbers', async () => {
      const server = await startServer();
      server.register('size', () => ({ size: 1n << 40n, huge: 1n << 64n }));
      const c = await client();
      await expect(c.request('size')).resolves.toEqual({ size: 2 ** 40, huge: '18446744073709551616' });
    });

    it('keeps the connection after a bad request', async () => {
      const server = await startServer();
      server.register('ping', () => 'pong');
      const r = await raw();
      r.send('{not json\n');
      expect(await r.next()).toMatchObject({ id: null, ok: false, error: { code: 'ERR_BAD_REQUEST', message: expect.stringContaining('not valid JSON') } });
      r.send('[1,2]\n');
      expect(await r.next()).toMatchObject({ id: null, ok: false, error: { code: 'ERR_BAD_REQUEST' } });
      r.send('{"id":7}\n');
      expect(await r.next()).toMatchObject({ id: 7, ok: false, error: { code: 'ERR_BAD_REQUEST', message: expect.stringContaining('"cmd"') } });
      r.send('{"id":8,"cmd":"ping","args":[1]}\n');
      expect(await r.next()).toMatchObject({ id: 8, ok: false, error: { code: 'ERR_BAD_REQUEST', message: expect.stringContaining('"args"') } });
      r.send('{"id":9,"cmd":"ping"}\n');
      expect(await r.next()).toEqual({ id: 9, ok: true, result: 'pong' });
    });

    it('names the known commands when the command is unknown', async () => {
      const server = await startServer();
      server.register('status', () => ({}));
      server.register('checkpoint', () => ({}));
      const c = await client();
      const err = await c.request('frobnicate').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BlkrepError);
      expect(err).toMatchObject({ code: 'ERR_UNKNOWN_COMMAND' });
      expect((err as Error).message).toBe('unknown command "frobnicate"; known commands: checkpoint, status, subscribe');
    });

    it("passes a handler's BlkrepError code and message to the client", async () => {
      const server = await startServer();
      server.register('fail', () => {
        throw new BlkrepError('ERR_NO_EXPORT', 'no export named "disk0"', { errno: 'EINVAL' });
      });
      server.register('crash', async () => {
        throw new Error('boom');
      });
      const c = await client();
      await expect(c.request('fail')).rejects.toMatchObject({ name: 'BlkrepError', code: 'ERR_NO_EXPORT', message: 'no export named "disk0"' });
      await expect(c.request('crash')).rejects.toMatchObject({ code: 'ERR_INTERNAL', message: expect.stringContaining('boom') });
    });

    it('refuses a second handler for the same command', async () => {
      const server = await startServer();
      server.register('status', () => ({}));
      expect(() => server.register('status', () => ({}))).toThrow(/registered twice/);
      expect(() => server.register('subscribe', () => ({}))).toThrow(/registered twice/);
    });

    it('answers a line over 1 MiB with an error, then hangs up', async () => {
      const server = await startServer();
      server.register('ping', () => 'pong');
      const r = await raw();
      r.send(Buffer.alloc(MAX_REQUEST_LINE_BYTES + 1, 0x20));
      expect(await r.next()).toMatchObject({
        id: null,
        ok: false,
        error: { code: 'ERR_LINE_TOO_LONG', message: expect.stringContaining(String(MAX_REQUEST_LINE_BYTES)) },
      });
      await r.ended;
      // Other connections are not affected.
      await expect((await client()).request('ping')).resolves.toBe('pong');
    });

    it('takes a line of exactly 1 MiB', async () => {
      const server = await startServer();
      server.register('echo', (args) => (args as { pad: string }).pad.length);
      const c = await client();
      const overhead = Buffer.byteLength(JSON.stringify({ id: 1, cmd: 'echo', args: { pad: '' } }));
      const pad = 'x'.repeat(MAX_REQUEST_LINE_BYTES - overhead);
      await expect(c.request('echo', { pad })).resolves.toBe(pad.length);
      await expect(c.request('echo', { pad: pad + 'x' })).rejects.toMatchObject({ code: 'ERR_LINE_TOO_LONG' });
    });

    it('times out and aborts a request on the client side', async () => {
      const server = await startServer();
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      cleanups.push(() => release());
      server.register('hang', () => held);
      const c = await client();
      const controller = new AbortController();
      const pending = c.request('hang', {}, { signal: controller.signal });
      controller.abort();
      const err = await pending.catch((e: unknown) => e);
      expect(isAbortError(err)).toBe(true);
      await expect(c.request('hang', {}, { timeoutMs: 1 })).rejects.toMatchObject({ code: 'ERR_CONTROL_TIMEOUT' });
    });
  });

  describe('events', () => {
    it('reaches subscribers only, filtered by name, with fields and time', async () => {
      const server = await startServer();
      server.register('ping', () => 'pong');
      const everything = await client();
      const readyOnly = await client();
      const bystander = await raw();
      const all: ControlEvent[] = [];
      const ready: ControlEvent[] = [];
      let allGotTwo!: () => void;
      const allDone = new Promise<void>((resolve) => (allGotTwo = resolve));
      await everything.subscribe(undefined, (e) => {
        all.push(e);
        if (all.length === 2) allGotTwo();
      });
      const readyArrived = new Promise<void>((resolve) =>
        void readyOnly.subscribe(['job.ready'], (e) => {
          ready.push(e);
          resolve();
        }),
      );
      // subscribe() resolved for `readyOnly` once its reply came: wait for that before publishing.
      await readyOnly.request('ping');

      server.publish('job.status', { job: 'm0', status: 'running' });
      server.emit({ event: 'job.ready', job: 'm0', synced: true });
      await Promise.all([allDone, readyArrived]);

      expect(all.map((e) => e.event)).toEqual(['job.status', 'job.ready']);
      expect(all[0]).toMatchObject({ event: 'job.status', job: 'm0', status: 'running' });
      expect(new Date(all[0]!.time).toISOString()).toBe(all[0]!.time);
      expect(ready).toEqual([expect.objectContaining({ event: 'job.ready', job: 'm0', synced: true })]);
      expect(Object.keys(ready[0]!)).toEqual(['event', 'job', 'synced', 'time']);

      // Had the bystander been sent an event, it would come before this reply.
      bystander.send('{"id":1,"cmd":"ping"}\n');
      expect(await bystander.next()).toEqual({ id: 1, ok: true, result: 'pong' });
    });

    it('answers subscribe with the selection, and rejects a bad one', async () => {
      await startServer();
      const r = await raw();
      r.send('{"id":1,"cmd":"subscribe"}\n{"id":2,"cmd":"subscribe","args":{"events":["a","b"]}}\n{"id":3,"cmd":"subscribe","args":{"events":"a"}}\n');
      expect(await r.next()).toEqual({ id: 1, ok: true, result: { events: 'all' } });
      expect(await r.next()).toEqual({ id: 2, ok: true, result: { events: ['a', 'b'] } });
      expect(await r.next()).toMatchObject({ id: 3, ok: false, error: { code: 'ERR_BAD_REQUEST' } });
    });
  });

  describe('socket file', () => {
    it('is mode 0600', async () => {
      const server = await startServer();
      const s = await stat(server.path);
      expect(s.isSocket()).toBe(true);
      expect((s.mode & 0o777).toString(8)).toBe('600');
    });

    it('replaces a stale socket file', async () => {
      await makeStaleSocket(path);
      expect((await lstat(path)).isSocket()).toBe(true);
      const server = await startServer();
      server.register('ping', () => 'pong');
      await expect((await client()).request('ping')).resolves.toBe('pong');
    });

    it('refuses to start where a server answers, and leaves that one working', async () => {
      const first = await startServer();
      first.register('ping', () => 'pong');
      const err = await ControlServer.listen(path).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_CONTROL_IN_USE' });
      expect((err as Error).message).toContain(path);
      await expect((await client()).request('ping')).resolves.toBe('pong');
    });

    it('refuses to replace a file that is not a socket', async () => {
      await writeFile(path, 'precious');
      await expect(ControlServer.listen(path)).rejects.toMatchObject({ code: 'ERR_CONTROL_PATH_EXISTS' });
      expect((await stat(path)).isFile()).toBe(true);
    });

    it('is removed by close(), which also hangs up on clients', async () => {
      const server = await ControlServer.listen(path);
      const c = await ControlClient.connect(path);
      const events: string[] = [];
      await c.subscribe(undefined, (e) => events.push(e.event));
      server.publish('shutdown', { pid: process.pid });
      await server.close();
      await c.closed;
      expect(events).toEqual(['shutdown']);
      await expect(lstat(path)).rejects.toMatchObject({ code: 'ENOENT' });
      await expect(c.request('status')).rejects.toMatchObject({ code: 'ERR_CONTROL_CLOSED' });
      await server.close();
    });
  });

  describe('caps per connection and on connections', () => {
    it('drops a subscriber that leaves more than maxUnreadBytes of events unread; the others are served', async () => {
      const server = await ControlServer.listen(path, { maxUnreadBytes: 64 << 10 });
      cleanups.push(() => server.close());
      server.register('ping', () => 'pong');
      const r = await raw();
      r.send('{"id":1,"cmd":"subscribe"}\n');
      expect(await r.next()).toEqual({ id: 1, ok: true, result: { events: 'all' } });
      r.socket.pause();
      const pad = 'x'.repeat(1024);
      for (let i = 0; i < 4096; i++) server.publish('tick', { i, pad });
      await waitFor(() => server.clientCount === 0, 'the server to drop the subscriber');
      r.socket.resume();
      await withTimeout(r.ended, 10_000, 'the subscriber to see the end');
      await expect((await client()).request('ping')).resolves.toBe('pong');
    });

    it('stops reading the requests of a client that does not read its replies, and loses none of them', async () => {
      const server = await ControlServer.listen(path, { pauseAtUnreadBytes: 16 << 10, maxPendingRequests: 4 });
      cleanups.push(() => server.close());
      let handled = 0;
      server.register('n', (args) => {
        handled++;
        return { n: (args as { n: number }).n, pad: 'y'.repeat(1000) };
      });
      const r = await raw();
      r.socket.pause();
      const total = 5000;
      let text = '';
      for (let n = 0; n < total; n++) text += `{"id":${n},"cmd":"n","args":{"n":${n}}}\n`;
      r.send(text);
      await waitFor(() => server.clients()[0]?.paused, 'the server to stop reading the client');
      const atPause = handled;
      expect(atPause).toBeLessThan(total);
      expect(server.clients()[0]!.inFlight).toBeLessThanOrEqual(4);
      r.socket.resume();
      const seen = new Set<number>();
      while (seen.size < total) {
        const reply = (await withTimeout(r.next(), 10_000, `reply ${seen.size + 1} of ${total}`)) as { id: number; ok: boolean; result: { n: number } };
        expect(reply.ok).toBe(true);
        expect(reply.result.n).toBe(reply.id);
        seen.add(reply.id);
      }
      expect(handled).toBe(total);
    });

    it('disconnects a client that leaves its replies unread for stallTimeoutMs, and says so in the log', async () => {
      const logged: string[] = [];
      const server = await ControlServer.listen(path, { pauseAtUnreadBytes: 16 << 10, stallTimeoutMs: 200, log: (level, message) => logged.push(`${level}: ${message}`) });
      cleanups.push(() => server.close());
      server.register('big', () => 'z'.repeat(4096));
      const r = await raw();
      r.socket.pause();
      r.send('{"id":1,"cmd":"big"}\n'.repeat(2000));
      await waitFor(() => server.clientCount === 0, 'the stalled client to be disconnected');
      expect(logged).toEqual([expect.stringMatching(/^warn: control: disconnecting a client that left \d+ bytes unread for 200 ms$/)]);
      // one that reads is not disconnected
      const c = await client();
      server.register('ping', () => 'pong');
      await expect(c.request('ping')).resolves.toBe('pong');
    });

    it('refuses a connection over maxClients with ERR_CONTROL_BUSY; a place freed is taken again', async () => {
      const server = await ControlServer.listen(path, { maxClients: 2 });
      cleanups.push(() => server.close());
      server.register('ping', () => 'pong');
      const a = await raw();
      await raw();
      await waitFor(() => server.clientCount === 2, 'two connections');
      const third = await raw();
      expect(await third.next()).toEqual({ id: null, ok: false, error: { code: 'ERR_CONTROL_BUSY', message: 'the daemon has 2 control connections, the limit is 2; try again later' } });
      await withTimeout(third.ended, 5000, 'the refused connection to close');
      const c = await ControlClient.connect(path);
      cleanups.push(() => c.close());
      await expect(c.request('ping')).rejects.toMatchObject({ code: 'ERR_CONTROL_BUSY' });
      a.socket.destroy();
      await waitFor(() => server.clientCount === 1, 'the server to see the close');
      await expect((await client()).request('ping')).resolves.toBe('pong');
    });

    it('closes only the connection whose request failed beyond its error reply, and logs why', async () => {
      const logged: string[] = [];
      const server = await ControlServer.listen(path, { log: (level, message) => logged.push(`${level}: ${message}`) });
      cleanups.push(() => server.close());
      server.register('ping', () => 'pong');
      server.register('evil', () => {
        // a thrown value that throws on every look: toBlkrepError cannot read it
        throw new Proxy({}, { get: () => { throw new RangeError('no looking'); }, getPrototypeOf: () => { throw new RangeError('no looking'); } });
      });
      const bystander = await client();
      const r = await raw();
      r.send('{"id":1,"cmd":"evil"}\n');
      expect(await r.next()).toMatchObject({ id: null, ok: false, error: { code: 'ERR_INTERNAL', message: expect.stringContaining('closing the connection') } });
      await withTimeout(r.ended, 5000, 'the failed connection to close');
      expect(logged).toEqual([expect.stringMatching(/^warn: control: closing a connection after an internal error: /)]);
      await expect(bystander.request('ping')).resolves.toBe('pong');
    });
  });

  describe('client', () => {
    it('reports a missing socket as unreachable, naming the path and how to start a daemon', async () => {
      const err = await ControlClient.connect(path).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BlkrepError);
      expect(err).toMatchObject({ code: 'ERR_CONTROL_UNREACHABLE' });
      expect((err as Error).message).toContain(path);
      expect((err as Error).message).toContain(`blkrep serve-nbd --control ${path}`);
    });

    it('reports a stale socket as unreachable', async () => {
      await makeStaleSocket(path);
      await expect(ControlClient.connect(path)).rejects.toMatchObject({
        code: 'ERR_CONTROL_UNREACHABLE',
        message: expect.stringContaining('nothing answers'),
      });
    });

    it('rejects the requests waiting when the daemon goes away', async () => {
      const server = await ControlServer.listen(path);
      cleanups.push(() => server.close());
      let entered!: () => void;
      const inHandler = new Promise<void>((resolve) => (entered = resolve));
      server.register('hang', () => {
        entered();
        return new Promise(() => {});
      });
      const c = await client();
      const rejected = expect(c.request('hang')).rejects.toMatchObject({ code: 'ERR_CONTROL_CLOSED' });
      await inHandler;
      await server.close();
      await rejected;
    });

    it('cancels a connect whose signal is aborted', async () => {
      await startServer();
      const err = await ControlClient.connect(path, { signal: AbortSignal.abort() }).catch((e: unknown) => e);
      expect(isAbortError(err)).toBe(true);
    });
  });
});
