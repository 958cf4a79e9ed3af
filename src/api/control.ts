/**
 * What the engine needs of the control socket to offer its verbs there: a place to register a
 * handler under a verb's name. The control server (src/control/server.ts) is one; the engine
 * (bitmaps, daemon jobs) registers its verbs through this contract and never imports the server.
 */

/** Handles one verb: takes the request's `args` (unchecked JSON), returns the reply's result. */
export type ControlHandler = (args: unknown) => Promise<unknown> | unknown;

/** A verb with its argument schema and handler, as src/control/verb.ts builds it (verb()). */
export interface ControlVerbLike {
  readonly name: string;
}

export interface ControlVerbRegistry {
  /**
   * Offer a verb: one built by verb() (its arguments checked against its schema before the
   * handler runs), or a name and a handler taking the arguments as they came. Registering a
   * verb twice is an error.
   */
  register(verb: ControlVerbLike | string, handler?: ControlHandler): void;
}
