/**
 * The `blkrep:register` oclif hook: adds the tcp heartbeat backend to the engine's registry
 * (engines older than the heartbeat slot pass no `heartbeats`, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createTcpHeartbeat } from './index.js';

const hook = async function registerTcpHeartbeat(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.heartbeats?.register('tcp', createTcpHeartbeat);
};

export default hook;
