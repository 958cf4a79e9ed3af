// test-man-pages: man/ is what the command definitions and man/prose produce, and every page
// renders without groff warnings.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, renderAll } from '../../scripts/gen-man.js';

describe('man pages', async () => {
  const pages = await renderAll();

  it('has a page for blkrep and for every command', () => {
    const commands = readdirSync(path.join(ROOT, 'src', 'commands')).filter((f) => f.endsWith('.ts')).map((f) => `blkrep-${f.replace(/\.ts$/, '')}.1`);
    expect(commands.length).toBeGreaterThan(0);
    for (const c of ['blkrep.1', ...commands]) expect([...pages.keys()]).toContain(c);
  });

  for (const [file, text] of pages) {
    it(`man/${file} is in step with the code (run npm run man after changing a command)`, () => {
      expect(readFileSync(path.join(ROOT, 'man', file), 'utf8')).toBe(text);
    });

    it(`man/${file} renders with groff -man -ww without warnings`, () => {
      const r = spawnSync('groff', ['-man', '-ww', '-z', '-Tutf8', path.join(ROOT, 'man', file)], { encoding: 'utf8' });
      expect(r.status).toBe(0);
      expect(r.stderr).toBe('');
    });
  }

  const handWritten = readdirSync(path.join(ROOT, 'man')).filter((f) => /\.[57]$/.test(f));
  it('has a page for each transport plugin', () => {
    for (const dir of readdirSync(path.join(ROOT, 'plugins'))) expect(handWritten).toContain(`blkrep-${dir}.7`);
  });
  for (const file of handWritten) {
    it(`man/${file} renders with groff -man -ww without warnings`, () => {
      const r = spawnSync('groff', ['-man', '-ww', '-z', '-Tutf8', path.join(ROOT, 'man', file)], { encoding: 'utf8' });
      expect(r.status).toBe(0);
      expect(r.stderr).toBe('');
    });
  }

  it('documents every flag of serve-nbd with its exit status section', () => {
    const text = pages.get('blkrep-serve-nbd.1')!;
    for (const flag of ['--socket', '--port', '--bind', '--read-only', '--shared', '--handshake-timeout', '--pid-file', '--control', '--export', '--json']) {
      expect(text).toContain(flag.replace(/-/g, '\\-'));
    }
    expect(text).toContain('.SH "EXIT STATUS"');
    const rendered = execFileSync('groff', ['-man', '-Tutf8', '-P', '-c', path.join(ROOT, 'man', 'blkrep-serve-nbd.1')], { encoding: 'utf8' });
    expect(rendered.replace(/.\x08/g, '')).toMatch(/EXAMPLES[\s\S]*blkrep serve-nbd disk\.img --socket/);
  });
});
