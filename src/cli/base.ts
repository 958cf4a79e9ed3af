/**
 * The base of every blkrep command: --json (the result on stdout, errors as
 * {"error":{"code","message"}}), and exit codes 0 success, 1 failure, 2 usage error.
 */
import { Command, Errors } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import type { RegisterHookOptions } from '../api/transport.js';
import { Heartbeats, Transports, Upgraders } from '../engine/registry.js';
import { writeStdout } from './stdio.js';

export const EXIT_SUCCESS = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** True for oclif's argument/flag parsing errors. */
function isUsageError(err: unknown): boolean {
  // Every oclif parser error (CLIParseError: NonExistentFlagsError, RequiredArgsError …) carries `parse`.
  if (err instanceof Errors.CLIError && 'parse' in err) return true;
  // A flag's value that its parser rejects (--port abc, --min-block-size abc): oclif rethrows
  // whatever the parser threw, with the message rewritten to start "Parsing --FLAG".
  if (err instanceof Error && /^Parsing --[\w-]+ \n\t/.test(err.message)) return true;
  // oclif's "Flag --X can only be specified once" is a plain Error
  if (err instanceof Error && /^Flag --[\w-]+ can only be specified once/.test(err.message)) return true;
  const name = (err as { constructor?: { name?: string } })?.constructor?.name ?? '';
  return /(Parse|Flag|Arg|Options|Exclusive|Dependency|Nonexistent|Unexpected|Required|FailedFlagValidation)Error/.test(name) || (err instanceof BlkrepError && (err.code === 'ERR_USAGE' || err.code === 'ERR_BAD_FILTER'));
}

export function errorCode(err: unknown): string {
  if (err instanceof BlkrepError) return err.code;
  if (isUsageError(err)) return 'ERR_USAGE';
  const code = (err as { code?: unknown })?.code;
  return typeof code === 'string' ? code : 'ERR_INTERNAL';
}

export abstract class BlkrepCommand extends Command {
  static override enableJsonFlag = true;

  /** Usage errors found after parsing (conflicting flags, bad specs) */
  protected usageError(message: string): never {
    throw new BlkrepError('ERR_USAGE', message, { errno: 'EINVAL' });
  }

  protected override toErrorJson(err: unknown): { error: { code: string; message: string } } {
    const message = err instanceof Error ? err.message : String(err);
    return { error: { code: errorCode(err), message } };
  }

  /** Print a single compact JSON line on stdout (for events while a command runs). */
  protected jsonLine(value: unknown): void {
    writeStdout(`${JSON.stringify(value)}\n`);
  }

  protected override async catch(err: Error & { exitCode?: number; oclif?: { exit?: number } }): Promise<unknown> {
    if (err instanceof Errors.ExitError) throw err;
    const usage = isUsageError(err);
    process.exitCode = usage ? EXIT_USAGE : (err.oclif?.exit ?? EXIT_FAILURE);
    if (this.jsonEnabled()) {
      this.jsonLine(this.toErrorJson(err));
      return;
    }
    // oclif prints the message and exits with the code we chose.
    if (usage && !(err instanceof BlkrepError)) throw err;
    this.logToStderr(`blkrep: ${err.message}`);
  }
}

/** What the installed plugins provide: transports, connection upgraders, heartbeat backends (each registers itself in the blkrep:register hook). */
export async function loadRegistries(command: Command): Promise<Required<RegisterHookOptions>> {
  const registries = { transports: new Transports(), upgraders: new Upgraders(), heartbeats: new Heartbeats() };
  const result = await command.config.runHook('blkrep:register', registries satisfies RegisterHookOptions);
  for (const failure of result.failures) {
    command.logToStderr?.(`blkrep: plugin ${failure.plugin.name} failed to register: ${failure.error.message}`);
  }
  return registries;
}

/** The transports the installed plugins provide. */
export async function loadTransports(command: Command): Promise<Transports> {
  return (await loadRegistries(command)).transports as Transports;
}
