/**
 * The behaviour every transport plugin must have, as one vitest suite each plugin runs against
 * itself (after js-libp2p's transport compliance tests). A third-party plugin imports it from
 * `blkrep/testing/transport-compliance` in a vitest test file (vitest is then its dev dependency):
 *
 *   runTransportCompliance('quic', createQuicTransport, () => '127.0.0.1:0', { uriScheme: 'nbd+quic:' });
 *
 * The tcp, unix and in-memory transports run it (the plugins' test folders, test/engine/transport-memory.test.ts).
 *
 * `address()` returns a fresh address to listen on (tcp "127.0.0.1:0", unix a path in a private
 * directory). Errors are checked by their stable codes: ERR_CONNECT_FAILED for nothing
 * listening, and the standard AbortError for a cancelled connect.
 */
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import type { Transport, TransportConnection, TransportListener } from '../api/index.js';

export interface ComplianceOptions {
  /** the scheme of `listener.uri()`, with its colon as URL.protocol has it ("nbd:", "nbd+unix:") */
  uriScheme?: string;
}

/** Everything a stream sends until its end, concatenated. */
export function readToEnd(stream: Duplex): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.once('end', () => resolve(Buffer.concat(chunks)));
    stream.once('error', reject);
  });
}

interface Accepted {
  connections: TransportConnection[];
  /** resolves with the next accepted connection */
  next(): Promise<TransportConnection>;
}

export function runTransportCompliance(
  name: string,
  make: () => Transport,
  address: () => string,
  options: ComplianceOptions = {},
): void {
  describe(`transport compliance: ${name}`, () => {
    const cleanups: Array<() => unknown> = [];

    afterEach(async () => {
      for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    });

    function track(stream: Duplex): void {
      cleanups.push(() => stream.destroy());
    }

    async function listen(
      onConnection: (c: TransportConnection) => void = () => {},
    ): Promise<{ transport: Transport; listener: TransportListener; accepted: Accepted }> {
      const transport = make();
      const connections: TransportConnection[] = [];
      const waiting: Array<(c: TransportConnection) => void> = [];
      const listener = await transport.listen(address(), {
        onConnection(c) {
          track(c.stream);
          connections.push(c);
          waiting.shift()?.(c);
          onConnection(c);
        },
      });
      cleanups.push(() => listener.close());
      const accepted: Accepted = {
        connections,
        next: () => new Promise((resolve) => waiting.push(resolve)),
      };
      return { transport, listener, accepted };
    }

    async function connect(transport: Transport, addr: string): Promise<TransportConnection> {
      const c = await transport.connect(addr, { timeoutMs: 10_000 });
      track(c.stream);
      return c;
    }

    it('has a name and a summary', () => {
      const transport = make();
      expect(transport.name).toBe(name);
      expect(transport.summary.length).toBeGreaterThan(0);
    });

    it('carries 1 MiB each way, byte for byte', async () => {
      const up = randomBytes(1 << 20);
      const down = randomBytes(1 << 20);
      let received: Promise<Buffer> | undefined;
      const { transport, listener, accepted } = await listen((c) => {
        received = readToEnd(c.stream);
        c.stream.end(down);
      });
      const serverSide = accepted.next();
      const client = await connect(transport, listener.address);
      const clientGot = readToEnd(client.stream);
      client.stream.end(up);
      await serverSide;
      const [atClient, atServer] = await Promise.all([clientGot, received!]);
      expect(atServer.length).toBe(up.length);
      expect(atServer.equals(up)).toBe(true);
      expect(atClient.length).toBe(down.length);
      expect(atClient.equals(down)).toBe(true);
    });

    it('serves 32 concurrent connections', async () => {
      const { transport, listener, accepted } = await listen((c) => c.stream.pipe(c.stream));
      const messages = Array.from({ length: 32 }, (_, i) => Buffer.from(`connection ${i} `.repeat(200)));
      const clients = await Promise.all(messages.map(() => connect(transport, listener.address)));
      const echoes = await Promise.all(
        clients.map((c, i) => {
          const echo = readToEnd(c.stream);
          c.stream.end(messages[i]!);
          return echo;
        }),
      );
      echoes.forEach((echo, i) => expect(echo.equals(messages[i]!)).toBe(true));
      expect(accepted.connections.length).toBe(32);
    });

    it('names the peer on both sides', async () => {
      const { transport, listener, accepted } = await listen();
      const serverSide = accepted.next();
      const client = await connect(transport, listener.address);
      expect(typeof client.peer).toBe('string');
      expect(client.peer.length).toBeGreaterThan(0);
      const server = await serverSide;
      expect(typeof server.peer).toBe('string');
      expect(server.peer.length).toBeGreaterThan(0);
    });

    it('reports the address actually bound, and it can be connected to', async () => {
      const { transport, listener, accepted } = await listen();
      expect(listener.address.length).toBeGreaterThan(0);
      expect(listener.address).not.toMatch(/:0$/);
      const serverSide = accepted.next();
      await connect(transport, listener.address);
      await serverSide;
    });

    it('gives a URI that parses, with the scheme and the percent-encoded export name', async () => {
      const { listener } = await listen();
      const exportName = 'disk 1/ä?#%';
      const url = new URL(listener.uri(exportName));
      if (options.uriScheme) expect(url.protocol).toBe(options.uriScheme);
      else expect(url.protocol).toMatch(/^nbd/);
      expect(decodeURIComponent(url.pathname.slice(1))).toBe(exportName);
      expect(url.hash).toBe('');
    });

    it('propagates a half-close as EOF, and the other direction keeps working', async () => {
      const { transport, listener } = await listen((c) => {
        void readToEnd(c.stream).then((got) => c.stream.end(Buffer.concat([Buffer.from('got '), got])));
      });
      const client = await connect(transport, listener.address);
      const reply = readToEnd(client.stream);
      client.stream.end(Buffer.from('ping'));
      expect((await reply).toString()).toBe('got ping');
    });

    it('stops accepting on close(), leaving existing connections alone', async () => {
      const { transport, listener, accepted } = await listen((c) => c.stream.pipe(c.stream));
      const serverSide = accepted.next();
      const existing = await connect(transport, listener.address);
      await serverSide;
      await listener.close();
      await expect(transport.connect(listener.address, { timeoutMs: 5_000 })).rejects.toMatchObject({ code: 'ERR_CONNECT_FAILED' });
      const echo = readToEnd(existing.stream);
      existing.stream.end(Buffer.from('still here'));
      expect((await echo).toString()).toBe('still here');
      expect(accepted.connections.length).toBe(1);
    });

    it('fails to connect to nothing with an error, well within the timeout', async () => {
      const { transport, listener } = await listen();
      const nothing = listener.address;
      await listener.close();
      const timeoutMs = 5_000;
      const started = performance.now();
      const err: unknown = await transport.connect(nothing, { timeoutMs }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Error);
      expect(err).toMatchObject({ code: 'ERR_CONNECT_FAILED' });
      expect((err as Error).message).toContain(nothing);
      expect(performance.now() - started).toBeLessThan(timeoutMs);
    });

    it('rejects a connect whose signal is already aborted', async () => {
      const { transport, listener } = await listen();
      await expect(transport.connect(listener.address, { signal: AbortSignal.abort() })).rejects.toMatchObject({ name: 'AbortError' });
    });

    it('cancels a connect in progress when its signal aborts', async () => {
      const { transport, listener } = await listen((c) => c.stream.destroy());
      const controller = new AbortController();
      const pending = transport.connect(listener.address, { signal: controller.signal, timeoutMs: 10_000 });
      // No connect completes within the same tick, so this abort always lands mid-connect.
      controller.abort();
      await expect(pending).rejects.toMatchObject({ name: 'AbortError' });
    });
  });
}
