// The workload of test-bitmap-crash, run as a separate process that the test kills with SIGKILL.
//
//   node crash-child.mjs LIBDIR IMAGE BITMAP SEED
//
// LIBDIR holds the compiled sources (src/bitmap/index.js, src/block/raw.js). Writes, write-zeroes
// and trims go through a DirtyTrackingNode over a raw file into the persistent bitmap, from
// several concurrent workers, with flushes, clears (as a copy loop does them) and checkpoints.
// Every line goes to stdout synchronously (a pipe on Linux), BEFORE the step it announces:
//   OPENING | READY <state> <epoch>
//   S <id> <offset> <length>   a write is requested (the filter's beforeWrite starts now)
//   I <offset> <length>         the filter issues a write to the raw file now (after beforeWrite)
//   D <offset> <length>         that write to the raw file settled (printed before the filter's
//                               afterWrite: the bitmap may treat the write as done from here)
//   A <id>                      the write was acknowledged
//   C <offset> <length>         bitmap.clear() is called now (synchronously)
//   K0 <n>                      checkpoint n is requested now
//   K1 <n>                      checkpoint n is complete
//   F0 / F1                     a flush starts / completed
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

const [libDir, image, bitmapPath, seedArg] = process.argv.slice(2);
const lib = (p) => import(pathToFileURL(join(libDir, p)).href);
const { PersistentBitmap, DirtyTrackingNode } = await lib('src/bitmap/index.js');
const { RawNode } = await lib('src/block/raw.js');

const say = (line) => process.stdout.write(`${line}\n`);

// mulberry32: small, seeded, good enough for a workload
let state = Number(seedArg) >>> 0;
function random() {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (n) => Math.floor(random() * n);

say('OPENING');
const raw = await RawNode.open(image);
const { bitmap, loadState } = await PersistentBitmap.open(bitmapPath, { size: raw.size });
// Between the filter and the raw file: announce each write as it reaches the image.
const issued = (op) => (offset, x, o) => {
  const length = typeof x === 'number' ? x : x.length;
  say(`I ${offset} ${length}`);
  const settled = () => say(`D ${offset} ${length}`);
  return raw[op](offset, x, o).then(
    (r) => {
      settled();
      return r;
    },
    (err) => {
      settled();
      throw err;
    },
  );
};
const probe = {
  driver: 'probe',
  description: raw.description,
  size: raw.size,
  limits: raw.limits,
  caps: raw.caps,
  read: (o, l, x) => raw.read(o, l, x),
  write: issued('write'),
  writeZeroes: issued('writeZeroes'),
  trim: issued('trim'),
  flush: (o) => raw.flush(o),
  extents: (o, l, x) => raw.extents(o, l, x),
  close: () => raw.close(),
};
const node = new DirtyTrackingNode(probe, [bitmap]);
const size = raw.size;
say(`READY ${loadState.state} ${bitmap.epoch}`);

let nextId = 0;
let checkpointing = false;
const data = Buffer.alloc(4 * 1024 * 1024, 0xa5);

function range() {
  const r = random();
  let length;
  if (r < 0.6) length = 1 + int(64 * 1024);
  else if (r < 0.9) length = 1 + int(1024 * 1024);
  else length = 1 + int(4 * 1024 * 1024);
  length = Math.min(length, size);
  let offset = int(size - length + 1);
  if (random() < 0.3) offset -= offset % 4096;
  if (random() < 0.05) offset = 0;
  if (random() < 0.05) offset = size - length;
  // a third of the requests follow the previous one (a sequential writer: the activity log's look-ahead)
  if (random() < 0.33 && lastEnd + length <= size) offset = lastEnd;
  lastEnd = offset + length;
  return [offset, length];
}
let lastEnd = 0;

async function worker() {
  for (;;) {
    const r = random();
    if (r < 0.62) {
      const [offset, length] = range();
      const id = nextId++;
      say(`S ${id} ${offset} ${length}`);
      await node.write(offset, data.subarray(0, length), { fua: random() < 0.05 });
      say(`A ${id}`);
    } else if (r < 0.7) {
      const [offset, length] = range();
      const id = nextId++;
      say(`S ${id} ${offset} ${length}`);
      await node.writeZeroes(offset, length);
      say(`A ${id}`);
    } else if (r < 0.76) {
      // now and then a trim of the whole disk: too many extents for the log, pre-marked instead
      const [offset, length] = random() < 0.05 ? [0, size] : range();
      const id = nextId++;
      say(`S ${id} ${offset} ${length}`);
      await node.trim(offset, length);
      say(`A ${id}`);
    } else if (r < 0.86) {
      say('F0');
      await node.flush();
      say('F1');
    } else if (r < 0.97) {
      const [offset, length] = random() < 0.1 ? [0, size] : range();
      say(`C ${offset} ${length}`);
      bitmap.clear(offset, length);
      await new Promise((resolve) => setImmediate(resolve));
    } else if (!checkpointing) {
      checkpointing = true;
      const n = bitmap.epoch;
      say(`K0 ${n}`);
      await bitmap.checkpoint();
      say(`K1 ${n}`);
      checkpointing = false;
    }
  }
}

await Promise.all(Array.from({ length: 8 }, worker));
