/* Register preservation across latency stubs (tests/live/test_latency.py). A compiler's
   inter-procedural register allocation lets a caller keep values in call-clobbered registers
   across a call to a function known not to touch them: the stubs must keep them too.

   long regcheck(long n): calls leaf_keep and leaf_tiny n times each with rcx, rdx, rsi, r8-r11
   and xmm8 (both halves) holding known values; returns how many calls changed one of them. */
        .text
        .globl leaf_keep
        .type leaf_keep, @function
        .p2align 4
leaf_keep:                              /* touches rax only; entry and exit windows apart */
        mov %rdi, %rax
        add $1, %rax
        imul $3, %rax, %rax
        xor $5, %rax
        ret
        .size leaf_keep, .-leaf_keep

        .globl leaf_tiny
        .type leaf_tiny, @function
        .p2align 4
leaf_tiny:                              /* its entry window ends with its ret: one stub for both */
        lea 1(%rdi), %rax
        ret
        .size leaf_tiny, .-leaf_tiny

        .globl regcheck
        .type regcheck, @function
        .p2align 4
regcheck:
        push %rbx
        push %rbp
        push %r12
        mov %rdi, %rbx                  /* calls left */
        xor %ebp, %ebp                  /* calls that changed a register */
1:      test %rbx, %rbx
        jz 9f
        lea leaf_keep(%rip), %r12
        call 2f
        lea leaf_tiny(%rip), %r12
        call 2f
        dec %rbx
        jmp 1b
9:      mov %rbp, %rax
        pop %r12
        pop %rbp
        pop %rbx
        ret
2:      mov $0x1111, %ecx               /* one checked call of *r12 */
        mov $0x2222, %edx
        mov $0x3333, %esi
        mov $0x8888, %r8d
        mov $0x9999, %r9d
        mov $0xaaaa, %r10d
        mov $0xbbbb, %r11d
        mov $0x5555, %eax
        movq %rax, %xmm8
        mov $0x6666, %eax
        pinsrq $1, %rax, %xmm8
        mov %rbx, %rdi
        call *%r12
        cmp $0x1111, %rcx
        jne 8f
        cmp $0x2222, %rdx
        jne 8f
        cmp $0x3333, %rsi
        jne 8f
        cmp $0x8888, %r8
        jne 8f
        cmp $0x9999, %r9
        jne 8f
        cmp $0xaaaa, %r10
        jne 8f
        cmp $0xbbbb, %r11
        jne 8f
        movq %xmm8, %rax
        cmp $0x5555, %rax
        jne 8f
        pextrq $1, %xmm8, %rax
        cmp $0x6666, %rax
        jne 8f
        ret
8:      inc %rbp
        ret
        .size regcheck, .-regcheck
        .section .note.GNU-stack,"",@progbits
