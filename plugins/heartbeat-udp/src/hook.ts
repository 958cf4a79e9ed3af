/**
 * The `blkrep:register` oclif hook: adds the udp heartbeat backend to the engine's registry
 * (engines older than the heartbeat slot pass no `heartbeats`, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createUdpHeartbeat } from './index.js';

const hook = async function registerUdpHeartbeat(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.heartbeats?.register('udp', createUdpHeartbeat);
};

export default hook;
