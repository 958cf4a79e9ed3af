/**
 * The `blkrep:register` oclif hook: adds the exec heartbeat backend to the engine's registry
 * (engines older than the heartbeat slot pass no `heartbeats`, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createExecHeartbeat } from './index.js';

const hook = async function registerExecHeartbeat(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.heartbeats?.register('exec', createExecHeartbeat);
};

export default hook;
