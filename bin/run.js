#!/usr/bin/env -S node --max-semi-space-size=2
// --max-semi-space-size=2: a small young generation. serve-nbd allocates at a high rate and
// V8's default lets each semispace grow to 16 MiB, which is most of its memory under load
// (bench/serve-nbd: peak RSS 115 -> 96 MiB). It only takes effect as a command-line flag.
//
// Enough libuv threads for many requests in flight against files (default is 4);
// must be set before the thread pool is first used, so before anything else loads.
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = '16';
const { execute } = await import('@oclif/core');
await execute({ dir: import.meta.url });
