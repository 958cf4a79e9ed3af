/** The daemon calling one of its own verbs in-process (automatic failover calls `failover`). */
import { join } from 'node:path';
import { z } from 'zod';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlServer } from '../../src/control/server.js';
import { verb } from '../../src/control/verb.js';
import { makeTempDir } from '../support/spawn.js';

describe('ControlServer.call', () => {
  let server: ControlServer | undefined;
  afterEach(async () => {
    await server?.close();
    server = undefined;
  });

  it('runs a registered verb with its arguments checked, and says which verbs exist', async () => {
    server = await ControlServer.listen(join(await makeTempDir(), 'ctl.sock'));
    server.register(verb({ name: 'failover', summary: 'test', args: z.object({ force: z.boolean().optional() }), result: '{}' }, (args) => ({ forced: args.force ?? false })));
    expect(server.has('failover')).toBe(true);
    expect(server.has('resume-io')).toBe(false);
    await expect(server.call('failover', {})).resolves.toEqual({ forced: false });
    await expect(server.call('failover', { force: 'yes' })).rejects.toMatchObject({ code: 'ERR_BAD_REQUEST' });
    await expect(server.call('resume-io')).rejects.toMatchObject({ code: 'ERR_UNKNOWN_COMMAND', message: expect.stringContaining('known commands: failover, subscribe') });
  });
});
