/**
 * The JSON contract (src/cli/output-schemas.ts, shipped as schemas/*.json): every command is run
 * with --json here — offline on images, live against serve-nbd, and a replication pair — and its
 * stdout validated against its schema; errors against the error schema, event lines against the
 * event schema. The last test checks that no command of the manifest went unchecked and that
 * schemas/ is what the schemas generate.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { EVENT_SCHEMAS, OUTPUT_SCHEMAS, errorSchema, eventSchema, jsonSchemaText, schemaFiles } from '../../src/cli/output-schemas.js';
import { BIN, REPO_ROOT, makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;
const checked = new Set<string>();

function validate(schema: z.ZodType, value: unknown, what: string): void {
  const r = schema.safeParse(value);
  if (!r.success) throw new Error(`${what} does not match its schema:\n${z.prettifyError(r.error)}\n${JSON.stringify(value, null, 2).slice(0, 2000)}`);
}

/** `blkrep ID ARGS --json`: exit 0 and stdout valid for the command's schema. */
async function ok(id: string, args: string[], timeoutMs = 60_000): Promise<any> {
  const r = await runCli([...id.split(' '), ...args, '--json'], { timeoutMs });
  expect(r.code, `blkrep ${id} ${args.join(' ')}: ${r.stderr}${r.stdout}`).toBe(0);
  const value = JSON.parse(r.stdout);
  validate(OUTPUT_SCHEMAS[id]!, value, `blkrep ${id} --json`);
  checked.add(id);
  return value;
}

/** Every event of a daemon from now on (blkrep events --json); done() stops and checks each line by its own schema. */
async function eventsOf(ctl: string, nbdUri: string): Promise<{ done: () => Promise<string[]> }> {
  const e = start(process.execPath, [BIN, 'events', '--control', ctl, '--json']);
  // subscribed once an NBD connection shows up as an event
  await waitFor(async () => {
    await run('nbdinfo', ['--size', nbdUri]);
    return e.stdout().includes('"event":"connection"') ? true : undefined;
  }, `blkrep events on ${ctl} to see a connection`, { timeoutMs: 30_000, intervalMs: 200 });
  return {
    done: async () => {
      await e.stop();
      const names: string[] = [];
      for (const line of e.stdout().trim().split('\n').filter((l) => l !== '')) {
        const value = JSON.parse(line) as { event: string };
        const schema = (EVENT_SCHEMAS as Record<string, z.ZodType>)[value.event];
        expect(schema, `event "${value.event}" has a schema in EVENT_SCHEMAS: ${line}`).toBeDefined();
        validate(schema!, value, `event line ${line}`);
        validate(eventSchema, value, `event line ${line}`);
        names.push(value.event);
      }
      return [...new Set(names)].sort();
    },
  };
}

/** A failing command: exit 1 or 2 and stdout valid for the error schema. */
async function fails(args: string[], code: string): Promise<void> {
  const r = await runCli([...args, '--json']);
  expect([1, 2]).toContain(r.code);
  const value = JSON.parse(r.stdout);
  validate(errorSchema, value, `blkrep ${args.join(' ')} --json (failing)`);
  expect(value.error.code).toBe(code);
}

describe('every command --json matches its schema', () => {
  it('image commands, offline jobs, bitmap files, version, errors', async () => {
    const dir = await makeTempDir();
    const p = (f: string) => join(dir, f);
    await ok('version', []);
    await writeFile(p('c.yaml'), 'image: memory:1M\nsocket: /tmp/x.sock\n');
    await ok('config check', [p('c.yaml')]);
    await writeFile(p('disk.img'), Buffer.alloc(4 * MiB));
    await ok('setup', ['--yes', '--role', 'secondary', '--disk', p('disk.img'), '--peer', '127.0.0.1', '--port', '20961', '--node-id', 'b', '--peer-id', 'a', '--root', p('root'), '--no-check']);
    await ok('create', ['-f', 'raw', p('a.raw'), '8M']);
    await ok('create', ['-f', 'qcow2', p('base.qcow2'), '8M']);
    await ok('create', ['-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', p('top.qcow2')]);
    const w = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 1M', p('top.qcow2')]);
    expect(w.code, w.stderr).toBe(0);
    await ok('info', [p('top.qcow2')]);
    await ok('info', [p('top.qcow2'), '--backing-chain']);
    await ok('map', [p('top.qcow2')]);
    await ok('check', [p('base.qcow2')]);
    await ok('create', ['-f', 'raw', p('m.raw'), '8M']);
    await ok('mirror', [p('top.qcow2'), p('m.raw')]);
    expect((await ok('compare', [p('m.raw'), p('top.qcow2')])).identical).toBe(true);
    await ok('create', ['-f', 'raw', p('b.raw'), '8M']);
    await ok('backup', [p('top.qcow2'), p('b.raw')]);
    await ok('commit', [p('top.qcow2')]);
    await ok('create', ['-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', p('top2.qcow2')]);
    await ok('make-empty', [p('top2.qcow2')]);

    await ok('bitmap add', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap add', [p('a.raw'), '--name', 'b2']);
    await ok('bitmap fill', [p('a.raw'), '--name', 'b2', '--range', '0:1M']);
    await ok('bitmap merge', [p('a.raw'), '--name', 'b1', '--source', 'b2']);
    await ok('bitmap list', [p('a.raw')]);
    await ok('bitmap dump', [p('a.raw'), '--name', 'b1', '--summary']);
    await ok('bitmap disable', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap enable', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap checkpoint', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap checkpoints', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap clear', [p('a.raw'), '--name', 'b1']);
    await ok('bitmap remove', [p('a.raw'), '--name', 'b2']);

    await fails(['info', p('missing.raw')], 'ERR_OPEN');
    await fails(['create', p('x.raw'), 'lots'], 'ERR_USAGE');
  }, 600_000);

  it('live: serve-nbd, status, mirror/backup/commit --control, job verbs, events', async () => {
    const dir = await makeTempDir();
    const p = (f: string) => join(dir, f);
    await ok('create', ['-f', 'raw', p('d.raw'), '8M']);
    await ok('create', ['-f', 'qcow2', p('base.qcow2'), '8M']);
    await ok('create', ['-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', p('ov.qcow2')]);
    await ok('create', ['-f', 'raw', p('t.raw'), '8M']);
    await ok('create', ['-f', 'raw', p('bk.raw'), '8M']);
    const ctl = p('ctl');
    const d = await serve(['--export', `disk=${p('d.raw')}`, '--export', `ov=${p('ov.qcow2')}`, '--socket', p('nbd'), '--control', ctl, '--bitmap', 'disk:b0']);
    validate(OUTPUT_SCHEMAS['serve-nbd']!, JSON.parse(d.listeningLine), 'serve-nbd listening line');
    checked.add('serve-nbd');
    await ok('status', ['--control', ctl]);
    const all = await eventsOf(ctl, unixUri(p('nbd'), 'disk'));
    await ok('mirror', ['--control', ctl, '--export', 'disk', p('t.raw'), '--wait', 'ready']);
    // --now: mirror0's status and its job-ready, as events
    const ev = await runCli(['events', '--control', ctl, '--now', '--count', '2', '--json']);
    expect(ev.code, ev.stderr).toBe(0);
    const lines = ev.stdout.trim().split('\n');
    expect(lines.length).toBe(2);
    for (const line of lines) validate(eventSchema, JSON.parse(line), `event line ${line}`);
    checked.add('events');
    await ok('job list', ['--control', ctl]);
    await ok('job show', ['mirror0', '--control', ctl]);
    await ok('job set-speed', ['mirror0', '64M', '--control', ctl]);
    await ok('job set-copy-mode', ['mirror0', 'write-blocking', '--control', ctl]);
    await ok('job pause', ['mirror0', '--control', ctl]);
    await ok('job resume', ['mirror0', '--control', ctl]);
    await waitFor(async () => JSON.parse((await runCli(['job', 'show', 'mirror0', '--control', ctl, '--json'])).stdout).status === 'ready', 'mirror0 ready again');
    await ok('job complete', ['mirror0', '--control', ctl, '--no-pivot']);
    await ok('backup', ['--control', ctl, '--export', 'disk', p('bk.raw'), '--wait', 'done']);
    await ok('commit', ['--control', ctl, '--export', 'ov', '--wait', 'ready']);
    await ok('job cancel', ['commit0', '--control', ctl]);
    await ok('bitmap list', ['--control', ctl]);
    await ok('bitmap checkpoint', ['--control', ctl, '--export', 'disk', '--name', 'b0']);
    await fails(['job', 'show', 'nosuch', '--control', ctl], 'ERR_JOB_NOT_FOUND');
    expect(await all.done()).toEqual(expect.arrayContaining(['bitmap-checkpoint', 'job-cancelled', 'job-completed', 'job-copy-mode', 'job-ready', 'job-status-change']));

    expect(await d.stop()).toBe(0);
    for (const line of d.stdout().trim().split('\n')) validate(eventSchema, JSON.parse(line), `serve-nbd line ${line}`);
  }, 600_000);

  it('a pair: replicate, checkpoint, failover --dry-run; demo', async () => {
    const dir = await makeTempDir();
    const p = (f: string) => join(dir, f);
    await writeFile(p('p.img'), Buffer.alloc(4 * MiB));
    await writeFile(p('s.img'), Buffer.alloc(4 * MiB));
    await serve([p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')]);
    await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl')]);
    const primaryEvents = await eventsOf(p('pctl'), unixUri(p('p.sock')));
    const secondaryEvents = await eventsOf(p('sctl'), unixUri(p('s.sock')));
    await ok('replicate', ['--control', p('pctl'), unixUri(p('s.sock'))]);
    await waitFor(async () => JSON.parse((await runCli(['status', '--control', p('pctl'), '--json'])).stdout).exports[0].pair?.link === 'connected', 'the pair link');
    await ok('checkpoint', ['--control', p('pctl')]);
    await ok('failover', ['--control', p('sctl'), '--dry-run']);
    expect(await primaryEvents.done()).toEqual(expect.arrayContaining(['checkpoint', 'replication-connected', 'resync-done', 'resync-started']));
    expect(await secondaryEvents.done()).toEqual(expect.arrayContaining(['checkpoint', 'connection', 'replication-connected']));
    // resume-io needs a daemon with a heartbeat (the peer need not exist: nothing is suspended)
    await serve(['memory:1M', '--socket', p('h.sock'), '--control', p('hctl'), '--heartbeat', 'udp://127.0.0.1:9', '--peer-id', 'b', '--node-id', 'a']);
    expect(await ok('resume-io', ['--control', p('hctl')])).toEqual({ resumed: false, waiting: 0 });
    await mkdir(p('demo'));
    await ok('demo', ['--size', '4M', '--dir', p('demo')], 180_000);
  }, 600_000);

  it('every event the code publishes has a schema (the names in publish calls of src/)', () => {
    const names = new Set<string>();
    const walk = (d: string): void => {
      for (const f of readdirSync(d, { withFileTypes: true })) {
        if (f.isDirectory()) walk(join(d, f.name));
        else if (f.name.endsWith('.ts')) for (const m of readFileSync(join(d, f.name), 'utf8').matchAll(/publish\??\.?\(\s*'([a-z][a-z0-9-]*)'/g)) names.add(m[1]!);
      }
    };
    walk(join(REPO_ROOT, 'src'));
    for (const n of ['peer-alive', 'peer-suspect', 'peer-dead', 'cbw-failed', 'secondary-failed', 'bitmap-enabled', 'bitmap-disabled']) names.add(n);
    for (const n of ['status-change', 'ready', 'copy-mode', 'error', 'completed', 'cancelled']) names.add(`job-${n}`);
    expect(names.size).toBeGreaterThan(30);
    expect([...names].filter((n) => !(n in EVENT_SCHEMAS)).sort()).toEqual([]);
    expect(Object.keys(EVENT_SCHEMAS).filter((n) => !names.has(n)).sort()).toEqual([]);
  });

  it('covers every command, and schemas/ is what src/cli/output-schemas.ts generates', () => {
    const manifest = JSON.parse(readFileSync(join(REPO_ROOT, 'oclif.manifest.json'), 'utf8')) as { commands: Record<string, unknown> };
    const ids = Object.keys(manifest.commands).map((id) => id.replaceAll(':', ' ')).sort();
    expect(Object.keys(OUTPUT_SCHEMAS).sort()).toEqual(ids);
    expect([...checked].sort()).toEqual(ids);
    for (const entry of schemaFiles()) {
      expect(readFileSync(join(REPO_ROOT, 'schemas', entry.file), 'utf8'), `schemas/${entry.file} (npm run schemas)`).toBe(jsonSchemaText(entry));
    }
  });
});
