import {Args} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {FlagValueError} from '../cli/flag-specs.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {resumeCommand} from '../cli/resume-command.js'
import {RESUME_SNAPSHOT_ARG, resumeFlagSpecs} from '../cli/resume-flags.js'
import {type ResumeResult} from '../resume/main/serving-session.js'

export default class Resume extends BaseCommand {
  static override summary = 'Serve a snapshot to a VMM or process as its userfaultfd page-fault handler.'
  static override description = `Listens on a Unix socket for Firecracker's Uffd memory backend handshake (the VMM sends its memory regions as JSON and the userfaultfd as SCM_RIGHTS), then serves every page fault from the snapshot: the faulting chunk is decoded (and cached), verified against its checksum, and the missing pages around the fault are installed with one UFFDIO_COPY; zero pages are mapped with UFFDIO_ZEROPAGE. Memory the client removes (balloon, UFFD_EVENT_REMOVE) reads as zeros afterwards.

Ready when the socket exists (with --also, every socket; and --ready-file is written); "listening on PATH" is logged to stderr. Handshakes are read as they arrive, side by side: a connection that sends nothing, or a byte at a time, holds up neither other VMs nor a signal, and is refused once its --timeout (with --serve at most 10 s) has passed since it connected. Ends with exit 0 when the client exits. On a corrupt chunk or any error that makes correct serving impossible the client is killed (through a pidfd taken when it connected) and the exit code is 1; with --no-kill the client is left frozen instead (reported "frozen"), never fed wrong bytes. A VMM that sent its uffd but not its whole handshake is killed too when it is refused or the handler stops; a uffd already being served, sent again, is refused. SIGINT/SIGTERM stop the handler (killing clients that still depend on it, unless --no-kill; exit 130). SIGUSR1 prints live statistics to stderr.

With --criu-dir DIR it is the lazy-pages daemon of \`criu restore --lazy-pages\` instead (in place of \`criu lazy-pages\`), serving a snapshot made with \`uffd snapshot --criu-dir DIR\`: it listens on lazy-pages.socket in --work-dir (default DIR, criu restore's own default working directory), takes each restored task's pid and userfaultfd, serves its faults, follows fork (the child is served too), mremap, munmap and MADV_DONTNEED, and once the restore finished fills all remaining memory in the background. Exit 0 when every task's memory has been delivered (the tasks then run on without the handler) or the tasks are gone; on a fatal error the restored tasks and their descendants are killed (unless --no-kill) and the exit code is 1.`

  static override examples = [
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --ready-file /tmp/ready --stats-file run.json',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --serve --cache-mb 1024',
    '<%= config.bin %> resume a.uffd --socket /tmp/a.sock --serve --also b.uffd=/tmp/b.sock   # two layers of one base, one handler',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --learn   # every resume makes the next one faster',
    '<%= config.bin %> resume app.uffd --criu-dir /tmp/dump &  criu restore -D /tmp/dump --lazy-pages --shell-job -d',
  ]

  static override args = {
    snapshot: Args.string({description: RESUME_SNAPSHOT_ARG, required: true}),
  }

  static override flags = oclifFlags(resumeFlagSpecs)

  async run(): Promise<ResumeResult> {
    const {args, flags} = await this.parse(Resume)
    try {
      return await resumeCommand(args.snapshot, flags, this.jsonEnabled())
    } catch (error) {
      if (error instanceof FlagValueError) this.error(error.message, {exit: 2})
      throw error
    }
  }
}
