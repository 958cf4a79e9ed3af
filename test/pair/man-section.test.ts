// test-pair-man-section: the "GENERATIONS AND SPLIT BRAIN" man section (a fragment for the
// failover and serve-nbd pages) renders without groff warnings, is one section the man page
// generator picks up, and names every rule of the generation table and every policy.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseProse } from '../../src/man/render.js';
import { REPO_ROOT, makeTempDir } from '../support/spawn.js';

const FRAGMENT = join(REPO_ROOT, 'man', 'prose', 'sections', 'generations-split-brain.roff');

describe('GENERATIONS AND SPLIT BRAIN man section', () => {
  const text = readFileSync(FRAGMENT, 'utf8');

  it('is one section for the page generator', () => {
    expect([...parseProse(text).keys()]).toEqual(['GENERATIONS AND SPLIT BRAIN']);
  });

  it('renders in a page with groff -man -ww without warnings', async () => {
    const dir = await makeTempDir();
    const page = join(dir, 'page.1');
    writeFileSync(page, `.TH BLKREP-TEST 1 "2026-11-22" "blkrep" "blkrep manual"\n.SH NAME\nblkrep\\-test \\- test\n${text}`);
    const r = spawnSync('groff', ['-man', '-ww', '-z', '-Tutf8', page], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it('names every rule and policy', () => {
    const plain = text.replace(/\\-/g, '-').replace(/\\f[BIR]/g, '').replace(/\\\(en/g, '–');
    for (const rule of ['10', '20', '30', '34–37', '40', '41', '50', '70', '51', '71', '60', '80', '90', '100', '-1000']) expect(plain).toMatch(new RegExp(`(^|[\\s,])${rule}([\\s,]|$)`, 'm'));
    for (const p of ['disconnect', 'discard-younger-primary', 'discard-older-primary', 'discard-zero-changes', 'discard-least-changes', 'discard-node=NAME', 'discard-secondary', 'consensus']) expect(plain).toContain(p);
    for (const code of ['ERR_PAIR_SPLIT_BRAIN', 'ERR_PAIR_UNRELATED', 'ERR_PAIR_ROLE', 'ERR_PAIR_OUTDATED', 'ERR_PAIR_STATE']) expect(plain).toContain(code);
  });
});
