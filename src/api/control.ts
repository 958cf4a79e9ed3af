/**
 * What the engine needs of the control socket to offer its verbs there: a place to register a
 * handler under a verb's name. The control server (src/control/server.ts) is one; the engine
 * (bitmaps, daemon jobs) registers its verbs through this contract and never imports the server.
 */

/** Handles one verb: takes the request's `args` (unchecked JSON), returns the reply's result. */
export type ControlHandler = (args: unknown) => Promise<unknown> | unknown;

export interface ControlVerbRegistry {
  /** Offer `verb`; registering a verb twice is an error. */
  register(verb: string, handler: ControlHandler): void;
}
