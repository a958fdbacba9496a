# The probed function of the loop benchmark in 32-bit (i386) code, cdecl, for the i386 rows
# (`djp_entry_i386`, `uprobe_i386`): the same computation as work.S's `work`, with its arguments
# on the stack. Only `work` is measured in 32-bit rows; the other functions loop.c names are the
# same code (work_atomic/work_plain with their counters, work_tsc/work_str without extras).
        .text

        .globl work
        .type work, @function
        .p2align 5
work:
        mov 4(%esp), %ecx               # x (4 bytes: the entry window is the two loads)
        mov 8(%esp), %edx               # limit
        lea 1(%ecx,%ecx,2), %eax
        cmp %edx, %ecx
        jl 1f
        sub %edx, %eax
        ret
1:      add %edx, %eax
        ret
        .size work, .-work

        .globl work_atomic
        .type work_atomic, @function
        .p2align 5
work_atomic:
        lock incl atomic_hits
        jmp work
        .size work_atomic, .-work_atomic

        .globl work_plain
        .type work_plain, @function
        .p2align 5
work_plain:
        incl %gs:plain_hits@ntpoff
        jmp work
        .size work_plain, .-work_plain

        .globl work_tsc
        .set work_tsc, work
        .globl work_str
        .set work_str, work

        .section .tbss,"awT",@nobits
        .globl plain_hits
        .p2align 6
plain_hits:
        .zero 4
        .size plain_hits, 4

        .bss
        .globl atomic_hits
        .p2align 6
atomic_hits:
        .long 0
        .size atomic_hits, 4

        .section .note.GNU-stack,"",@progbits
