import {defineConfig} from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    disableConsoleIntercept: true,
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Tests that use real userfaultfds, child processes and KVM are timing-sensitive on 2 cores.
    fileParallelism: true,
    maxWorkers: 2,
  },
})
