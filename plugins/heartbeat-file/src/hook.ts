/**
 * The `blkrep:register` oclif hook: adds the file heartbeat backend to the engine's registry
 * (engines older than the heartbeat slot pass no `heartbeats`, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createFileHeartbeat } from './index.js';

const hook = async function registerFileHeartbeat(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.heartbeats?.register('file', createFileHeartbeat);
};

export default hook;
