/** A fake stderr for the spinner and progress tests: a terminal or not, keeping what was written. */
import { Writable } from 'node:stream';

export function fakeStream(isTTY: boolean): NodeJS.WriteStream & { text(): string } {
  let out = '';
  const w = new Writable({
    write(chunk, _enc, cb) {
      out += String(chunk);
      cb();
    },
  }) as unknown as NodeJS.WriteStream & { text(): string };
  Object.assign(w, { isTTY, columns: 80, rows: 24, cursorTo: () => true, clearLine: () => true, moveCursor: () => true, text: () => out });
  return w;
}
