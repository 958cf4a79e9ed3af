import path from 'node:path';
import { Flags } from '@oclif/core';
import { Listr, ListrLogger, ProcessOutput } from 'listr2';
import { BlkrepCommand, EXIT_FAILURE } from '../cli/base.js';
import { sizeFlag } from '../cli/flags.js';
import { cleanUp, createContext, demoTasks, type DemoResult, type DemoStep } from '../pair/demo.js';

export default class Demo extends BlkrepCommand {
  static override summary = 'Run a whole replication pair on this machine: replicate, checkpoint, kill the primary, fail over, fail back.';

  static override description = `Starts two serve-nbd daemons (separate processes, on Unix sockets in a temporary directory): a secondary (host B) and a primary (host A) replicating to it. Writes 0x11 over the disk through the primary, takes a checkpoint, writes 0x22 over the second half, kills the primary with SIGKILL, fails over to the secondary at the checkpoint and checks byte for byte that it holds the checkpoint (all 0x11). Then fails back: A restarts as the secondary of B, is resynced, and the two disks are compared.

On a terminal each step is shown as a task list on stderr; otherwise (and with --json) only the result is printed. The daemons are stopped and the directory removed at the end, unless --keep. The temporary directory (TMPDIR, else /tmp) needs 2.5 times --size free: a --size it cannot hold is a usage error.

Exit status: 0 when every step passed, 1 when one failed (the failed step and why are printed), 2 on a usage error.`;

  static override examples = [
    { description: 'Watch the pair work', command: '<%= config.bin %> <%= command.id %>' },
    { description: 'Asynchronous replication, 256 MiB disks, keep the images to look at', command: '<%= config.bin %> <%= command.id %> --protocol async --size 256M --keep' },
    { description: 'In a script: did failover hold the checkpoint?', command: '<%= config.bin %> <%= command.id %> --json | jq .failoverVerified' },
  ];

  static override flags = {
    size: sizeFlag({ description: 'size of each disk (a multiple of 1M, at least 2M)', default: 64 * 1024 * 1024, helpValue: 'SIZE' }),
    protocol: Flags.string({ description: 'replication protocol', options: ['sync', 'async'], default: 'sync' }),
    dir: Flags.string({ description: 'make the temporary directory in DIR [default: the system\'s temporary directory]', helpValue: 'DIR' }),
    keep: Flags.boolean({ description: 'leave the temporary directory and its images in place (its path is printed)', default: false }),
  };

  async run(): Promise<DemoResult> {
    const { flags } = await this.parse(Demo);
    const ctx = await createContext({
      size: flags.size,
      protocol: flags.protocol as 'sync' | 'async',
      keep: flags.keep,
      bin: path.join(this.config.root, 'bin', 'run.js'),
      ...(flags.dir === undefined ? {} : { parentDir: flags.dir }),
    });
    const steps: DemoStep[] = [];
    const onTerminal = process.stderr.isTTY === true && !this.jsonEnabled() && process.env['TERM'] !== 'dumb';
    const output = new ProcessOutput(process.stderr, process.stderr);
    const list = new Listr(
      demoTasks().map((t) => ({
        title: t.title,
        rendererOptions: { persistentOutput: true },
        task: async (_: unknown, task: { output: string; title: string }) => {
          const started = Date.now();
          const detail = await t.run(ctx);
          const ms = Date.now() - started;
          steps.push({ id: t.id, title: t.title, ms, detail });
          task.output = detail;
        },
      })),
      onTerminal
        ? { renderer: 'default', rendererOptions: { logger: new ListrLogger({ processOutput: output }) }, exitOnError: true }
        : { renderer: 'silent', exitOnError: true },
    );
    let failure: Error | undefined;
    const stop = () => {
      void cleanUp(ctx).finally(() => process.exit(130));
    };
    process.once('SIGINT', stop);
    try {
      await list.run();
    } catch (err) {
      failure = err as Error;
    } finally {
      process.off('SIGINT', stop);
      await cleanUp(ctx);
    }
    const result: DemoResult = {
      dir: ctx.dir,
      kept: flags.keep,
      size: flags.size,
      protocol: ctx.options.protocol,
      epoch: ctx.epoch,
      failoverVerified: ctx.failoverVerified,
      failbackVerified: ctx.failbackVerified,
      steps,
    };
    if (failure) {
      const failed = demoTasks()[steps.length];
      process.exitCode = EXIT_FAILURE;
      if (this.jsonEnabled()) return { ...result, error: { step: failed?.id ?? null, message: failure.message } } as DemoResult;
      if (!onTerminal) for (const s of steps) this.log(`ok   ${s.title} (${s.ms} ms): ${s.detail}`);
      this.logToStderr(`blkrep demo: step "${failed?.title ?? '?'}" failed: ${failure.message}`);
      if (flags.keep) this.logToStderr(`the images are in ${ctx.dir}`);
      return result;
    }
    if (!this.jsonEnabled()) {
      if (!onTerminal) for (const s of steps) this.log(`ok   ${s.title} (${s.ms} ms): ${s.detail}`);
      this.log(`The pair held: after kill -9 of the primary, the secondary had checkpoint ${ctx.epoch} byte for byte; after failback both disks are equal.`);
      if (flags.keep) this.log(`Images and sockets are in ${ctx.dir}`);
    }
    return result;
  }
}
