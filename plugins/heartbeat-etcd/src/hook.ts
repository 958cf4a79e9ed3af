/**
 * The `blkrep:register` oclif hook: adds the etcd heartbeat backend to the engine's registry
 * (engines older than the heartbeat slot pass no `heartbeats`, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createEtcdHeartbeat } from './index.js';

const hook = async function registerEtcdHeartbeat(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.heartbeats?.register('etcd', createEtcdHeartbeat);
};

export default hook;
