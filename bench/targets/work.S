# The probed functions of the loop benchmark, in assembly so that every probe site is the same
# from one compiler to the next.
#
#   long work(long x, long limit)          the plain function: entry probes go at `work`
#   long work_atomic(long x, long limit)   the same with an atomic counter compiled in
#                                          (`lock incq` of one shared counter)
#   long work_plain(long x, long limit)    the same with a plain per-thread counter compiled in
#                                          (`incq %fs:...`: the physical limit of counting)
#   long work_str(const char *s, long limit)  the plain function's code, with a string argument
#                                          (the string-fetch rows read it at each hit)
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

        .globl work_str
        .type work_str, @function
        .p2align 5
work_str:
        cmp %rsi, %rdi
        lea 1(%rdi,%rdi,2), %rax
        mov %rsi, %rdx
        jl 1f
        sub %rdx, %rax
        ret
1:      add %rdx, %rax
        ret
        .size work_str, .-work_str

        .section .tbss,"awT",@nobits
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
