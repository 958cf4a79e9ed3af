/**
 * What a person at a terminal (tmux) sees. make-empty of an image with no backing file asks
 * first. Ctrl-C while a live command waits (mirror --control … --wait, in a real terminal: tmux):
 * the terminal gets its cursor back, the message says the job keeps running in the daemon,
 * exit 130, and the job does keep running.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, hasTool, makeTempDir, runCli, serve, waitFor } from '../support/spawn.js';

function tmux(socket: string, ...args: string[]): string {
  const r = spawnSync('tmux', ['-S', socket, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`tmux ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

describe.runIf(hasTool('tmux'))('Ctrl-C during a live --wait', () => {
  it('restores the cursor, says the job keeps running, exits 130; the job is still running', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.img');
    const ctl = join(dir, 'ctl');
    expect((await runCli(['create', '-f', 'raw', img, '64M'])).code).toBe(0);
    expect((await runCli(['create', '-f', 'raw', join(dir, 'new.img'), '64M'])).code).toBe(0);
    await serve([img, '--socket', join(dir, 'nbd.sock'), '--control', ctl]);
    const sock = join(dir, 'tmux.sock');
    const cmd = `${process.execPath} ${BIN} mirror --control ${ctl} ${join(dir, 'new.img')} --speed 1M --wait; echo EXIT=$?; sleep 60`;
    tmux(sock, 'new-session', '-d', '-x', '120', '-y', '20', '-s', 't', cmd);
    try {
      await waitFor(() => tmux(sock, 'capture-pane', '-p', '-t', 't').includes('job mirror0'), 'the progress bar', { timeoutMs: 30_000, intervalMs: 200 });
      expect(tmux(sock, 'display', '-p', '-t', 't', '#{cursor_flag}').trim()).toBe('0'); // the bar hides it
      tmux(sock, 'send-keys', '-t', 't', 'C-c');
      const screen = await waitFor(() => {
        const s = tmux(sock, 'capture-pane', '-p', '-t', 't');
        return s.includes('EXIT=') ? s : undefined;
      }, 'the command to exit', { timeoutMs: 20_000, intervalMs: 200 });
      expect(screen).toContain('EXIT=130');
      expect(screen.replace(/\n/g, ' ')).toMatch(/interrupted: stopped waiting; job mirror0 keeps running in the daemon/);
      expect(tmux(sock, 'display', '-p', '-t', 't', '#{cursor_flag}').trim()).toBe('1');
    } finally {
      spawnSync('tmux', ['-S', sock, 'kill-server']);
    }
    const show = await runCli(['job', 'show', 'mirror0', '--control', ctl, '--json']);
    const q = JSON.parse(show.stdout) as { id: string; status: string };
    expect(q.id).toBe('mirror0');
    expect(['running', 'ready']).toContain(q.status); // not concluded: the job went on
    expect((await runCli(['job', 'cancel', 'mirror0', '--force', '--control', ctl, '--json'])).code).toBe(0);
  });
});

describe.runIf(hasTool('tmux') && hasTool('qemu-io'))('make-empty on a terminal', () => {
  it('asks before destroying an image without a backing file; "n" changes nothing (exit 1), "y" empties it', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'solo.qcow2');
    expect((await runCli(['create', img, '4M'])).code).toBe(0);
    expect(spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 64k', img]).status).toBe(0);
    const sock = join(dir, 'tmux.sock');
    for (const [answer, exit, pattern] of [['n', 1, 0x07], ['y', 0, 0x00]] as const) {
      const cmd = `${process.execPath} ${BIN} make-empty ${img}; echo EXIT=$?; sleep 60`;
      tmux(sock, 'new-session', '-d', '-x', '160', '-y', '20', '-s', 't', cmd);
      try {
        await waitFor(() => tmux(sock, 'capture-pane', '-p', '-t', 't').includes('Empty anyway?'), 'the question', { timeoutMs: 30_000, intervalMs: 200 });
        expect(tmux(sock, 'capture-pane', '-p', '-t', 't')).toContain('has no backing file: emptying destroys the data');
        tmux(sock, 'send-keys', '-t', 't', answer, 'Enter');
        const screen = await waitFor(() => {
          const s = tmux(sock, 'capture-pane', '-p', '-t', 't');
          return s.includes('EXIT=') ? s : undefined;
        }, 'make-empty to exit', { timeoutMs: 20_000, intervalMs: 200 });
        expect(screen).toContain(`EXIT=${exit}`);
      } finally {
        spawnSync('tmux', ['-S', sock, 'kill-server']);
      }
      const read = spawnSync('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P ${pattern} 0 64k`, img], { encoding: 'utf8' });
      expect(read.stdout).not.toContain('Pattern verification failed');
      expect(read.status).toBe(0);
    }
  });
});
