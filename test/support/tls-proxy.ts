/**
 * TLS as a transport parameter of the raw-socket suites (conformance): a proxy on a Unix socket
 * that speaks clear NBD to the test's RawClient and TLS to the server under test. Per connection:
 * the server's greeting goes to the client as it is, the client's flags go to the server as they
 * are, then the proxy sends NBD_OPT_STARTTLS, upgrades through the product's tls upgrader (the
 * client side of plugins/transport-tls), and from then on relays bytes both ways, EOF included.
 * So every option and request of the suite runs inside TLS, against a FORCEDTLS server.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import type { ConnectionUpgrader } from '../../src/api/transport.js';
import { startTls } from '../../src/nbd/starttls.js';
import { ExactReader } from '../../src/nbd/handshake-io.js';

export interface TlsProxy {
  path: string;
  close(): Promise<void>;
}

export async function startTlsProxy(path: string, target: string, upgrader: ConnectionUpgrader, settings: Readonly<Record<string, string>>): Promise<TlsProxy> {
  const sockets = new Set<Duplex>();
  const server = net.createServer({ allowHalfOpen: true }, (down) => {
    sockets.add(down);
    down.on('close', () => sockets.delete(down));
    down.on('error', () => {});
    down.pause();
    void relay(down).catch(() => down.destroy());
  });

  async function relay(down: net.Socket): Promise<void> {
    const up = net.connect(target);
    sockets.add(up);
    down.on('close', () => up.destroy());
    up.on('close', () => sockets.delete(up));
    up.on('error', () => down.destroy());
    const fromServer = new ExactReader(up);
    const greeting = await fromServer.read(18);
    down.write(greeting);
    const fromClient = new ExactReader(down);
    down.resume();
    const flags = await fromClient.read(4);
    const early = fromClient.detach();
    down.pause();
    up.write(flags);
    const upgraded = await startTls({ stream: up, peer: target }, fromServer, upgrader, settings, { timeoutMs: 10_000 });
    const t = upgraded.stream;
    sockets.add(t);
    t.on('error', () => down.destroy());
    down.on('close', () => t.destroy());
    t.on('close', () => down.destroy());
    if (early.length) t.write(early);
    // EOF both ways, so a half-close (ABORT, DISC) reaches the other side as it would directly
    down.pipe(t);
    t.pipe(down);
    down.resume();
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  return {
    path,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
