/**
 * Records which sockets wrote with writev (a request's header and payload together) while a test
 * file runs: `recordWritevSockets()` in the file's top level hooks `net.Socket.prototype._writev`
 * for the file (restored in afterAll) and returns the live set, cleared after each test.
 */
import net from 'node:net';
import { afterAll, afterEach, beforeAll } from 'vitest';

export function recordWritevSockets(): Set<net.Socket> {
  const sockets = new Set<net.Socket>();
  const origWritev = net.Socket.prototype._writev!;
  beforeAll(() => {
    net.Socket.prototype._writev = function (this: net.Socket, ...args: Parameters<typeof origWritev>) {
      sockets.add(this);
      return origWritev.apply(this, args);
    };
  });
  afterAll(() => {
    net.Socket.prototype._writev = origWritev;
  });
  afterEach(() => sockets.clear());
  return sockets;
}

/** the file descriptor under a connected net.Socket */
export function fdOf(sock: net.Socket): number {
  return (sock as unknown as { _handle: { fd: number } })._handle.fd;
}
