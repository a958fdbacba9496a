# The probed functions of the loop benchmark, in assembly so that every probe site is the same
# from one compiler to the next.
#
#   long work(long x, long limit)          the plain function: entry probes go at `work`
#   long work_atomic(long x, long limit)   the same with an atomic counter compiled in
#                                          (`lock incq` of one shared counter)
#   long work_plain(long x, long limit)    the same with a plain per-thread counter compiled in
#                                          (`incq %fs:...`: the physical limit of counting)
#
# Site `work+3` lies between the `cmp` and the `jl` that reads its flags: a probe there must
# keep the flags live (and the red zone: it is not a call boundary).
        .text

        .globl work
        .type work, @function
        .p2align 5
work:
        cmp %rsi, %rdi                  # 3 bytes: flags read by jl below
        lea 1(%rdi,%rdi,2), %rax        # 5 bytes: site work+3 (displaced alone)
        mov %rsi, %rdx
        jl 1f
        sub %rdx, %rax
        ret
1:      add %rdx, %rax
        ret
        .size work, .-work

        .globl work_atomic
        .type work_atomic, @function
        .p2align 5
work_atomic:
        lock incq atomic_hits(%rip)
        cmp %rsi, %rdi
        lea 1(%rdi,%rdi,2), %rax
        mov %rsi, %rdx
        jl 1f
        sub %rdx, %rax
        ret
1:      add %rdx, %rax
        ret
        .size work_atomic, .-work_atomic

        .globl work_plain
        .type work_plain, @function
        .p2align 5
work_plain:
        incq %fs:plain_hits@tpoff
        cmp %rsi, %rdi
        lea 1(%rdi,%rdi,2), %rax
        mov %rsi, %rdx
        jl 1f
        sub %rdx, %rax
        ret
1:      add %rdx, %rax
        ret
        .size work_plain, .-work_plain

        # The same with a latency measurement compiled in: the TSC read at the entry and before
        # each return, the log2 bucket of the difference incremented in a per-thread histogram
        # (the physical limit of measuring every call's duration: two TSC reads, no sharing).
        .globl work_tsc
        .type work_tsc, @function
        .p2align 5
work_tsc:
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, %r8
        cmp %rsi, %rdi
        lea 1(%rdi,%rdi,2), %rax
        mov %rsi, %rdx
        jl 1f
        sub %rdx, %rax
        jmp 2f
1:      add %rdx, %rax
2:      mov %rax, %r9
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        sub %r8, %rax
        lea 1(%rax,%rax), %rax
        bsr %rax, %rax
        incq %fs:tsc_hist@tpoff(,%rax,8)
        mov %r9, %rax
        ret
        .size work_tsc, .-work_tsc

        .section .tbss,"awT",@nobits
        .globl tsc_hist
        .p2align 6
tsc_hist:
        .zero 512
        .size tsc_hist, 512

        .globl plain_hits
        .p2align 6
plain_hits:
        .zero 8
        .size plain_hits, 8

        .bss
        .globl atomic_hits
        .p2align 6
atomic_hits:
        .quad 0
        .size atomic_hits, 8

        .section .note.GNU-stack,"",@progbits
