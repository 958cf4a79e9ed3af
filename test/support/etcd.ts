/**
 * A real one-node etcd for the heartbeat tests (Debian etcd-server, installed by scripts/setup.sh):
 * data on tmpfs (3.4 has no --unsafe-no-fsync), free ports, stopped and removed after the test.
 * `restart()` kills it (SIGKILL) and starts it again on the same ports and data, as a crashed and
 * restarted etcd would be.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { afterEach } from 'vitest';
import { freeTcpPort } from './heartbeat.js';
import { start, waitFor, type Started } from './spawn.js';

export interface Etcd {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  /** etcd://127.0.0.1:PORT/PREFIX */
  uri: (prefix: string) => string;
  /** the running process (replaced by restart()) */
  proc: Started;
  /** SIGKILL it and start it again on the same ports and data; resolves once it is healthy */
  restart: (downMs?: number) => Promise<void>;
  /** SIGKILL it (it stays down) */
  kill: () => Promise<void>;
}

const dirs: string[] = [];
afterEach(async () => {
  // the processes are killed by spawn.ts's own afterEach (scope "test")
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function healthy(endpoint: string, what: string): Promise<void> {
  await waitFor(async () => (await fetch(`${endpoint}/health`).then((r) => r.json() as Promise<{ health?: string }>).catch(() => null))?.health === 'true', what, { timeoutMs: 20_000, intervalMs: 50 });
}

export async function startEtcd(): Promise<Etcd> {
  const dir = await mkdtemp('/dev/shm/blkrep-etcd-');
  dirs.push(dir);
  const [c, p] = [await freeTcpPort(), await freeTcpPort()];
  const args = ['--name', 'n1', '--data-dir', dir, '--listen-client-urls', `http://127.0.0.1:${c}`, '--advertise-client-urls', `http://127.0.0.1:${c}`, '--listen-peer-urls', `http://127.0.0.1:${p}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${p}`, '--initial-cluster', `n1=http://127.0.0.1:${p}`, '--initial-cluster-state', 'new', '--log-level', 'error'];
  const endpoint = `http://127.0.0.1:${c}`;
  const etcd: Etcd = {
    endpoint,
    uri: (prefix) => `etcd://127.0.0.1:${c}${prefix}`,
    proc: start('etcd', args),
    kill: async () => {
      await etcd.proc.stop('SIGKILL');
    },
    restart: async (downMs = 0) => {
      await etcd.kill();
      if (downMs > 0) await new Promise((r) => setTimeout(r, downMs));
      etcd.proc = start('etcd', args);
      await healthy(endpoint, `etcd restarted on ${endpoint}; stderr: ${etcd.proc.stderr()}`);
    },
  };
  await healthy(endpoint, `etcd on ${endpoint}; stderr: ${etcd.proc.stderr()}`);
  return etcd;
}
