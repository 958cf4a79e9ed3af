/**
 * The `blkrep:register` oclif hook: the engine runs it with its registries
 * (`config.runHook('blkrep:register', { transports })`) and this plugin adds its factory.
 *
 * Typed without @oclif/core: oclif calls a hook as `hook.call(context, { ...options, config,
 * context })`, and a function taking just the options it needs fits that call.
 */
import type { RegisterHookOptions } from 'blkrep/api';
import { createUnixTransport } from './index.js';

const hook = async function registerUnixTransport(this: unknown, options: RegisterHookOptions): Promise<void> {
  options.transports.register('unix', createUnixTransport);
};

export default hook;
