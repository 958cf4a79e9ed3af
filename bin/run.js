#!/usr/bin/env node
// Enough libuv threads for many requests in flight against files (default is 4);
// must be set before the thread pool is first used, so before anything else loads.
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = '16';
const { execute } = await import('@oclif/core');
await execute({ dir: import.meta.url });
