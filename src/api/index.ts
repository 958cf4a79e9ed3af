export * from './errors.js';
export type * from './block.js';
export type * from './transport.js';
export * from './heartbeat.js';
export type * from './control.js';
