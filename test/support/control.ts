/**
 * One control-socket request from a test (connect, request, close), and the pair status of a
 * daemon's export in a pair: what the two-daemon tests of the pair and heartbeat ask again and again.
 */
import { ControlClient } from '../../src/control/client.js';
import type { PairStatus } from '../../src/pair/role.js';

export async function controlRequest<T>(control: string, cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
  const c = await ControlClient.connect(control);
  try {
    return (await c.request(cmd, args, { timeoutMs })) as T;
  } finally {
    await c.close();
  }
}

/** `status` → the pair status of the daemon's export that is in a pair. */
export async function pairOf<T = PairStatus>(control: string): Promise<T> {
  const s = await controlRequest<{ exports: Array<{ pair?: PairStatus }> }>(control, 'status');
  return s.exports.find((e) => e.pair)!.pair! as T;
}
