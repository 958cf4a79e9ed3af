/**
 * The `blkrep:register` oclif hook: adds the "tls" connection upgrader to the engine's registry
 * (engines older than the upgrader slot pass none, and get nothing).
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createTlsUpgrader } from './index.js';

const hook = async function registerTlsUpgrader(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.upgraders?.register('tls', createTlsUpgrader);
};

export default hook;
