/* Register preservation across 32-bit latency stubs (tests/live/test_i386_latency.py): a caller
   may keep values in any register a callee does not touch (its own assembly, or a compiler's
   inter-procedural register allocation): the stubs must keep them all.

   int regcheck(int n): calls leaf_keep and leaf_tiny n times each with ebx, ecx, edx, esi, edi,
   ebp, xmm0 and xmm1 (all four dwords) holding known values; returns how many calls changed one
   of them. */
        .text
        .globl leaf_keep
        .type leaf_keep, @function
        .p2align 4
leaf_keep:                              /* touches eax only; entry and exit windows apart */
        mov 4(%esp), %eax
        add $1, %eax
        imul $3, %eax, %eax
        xor $5, %eax
        ret
        .size leaf_keep, .-leaf_keep

        .globl leaf_tiny
        .type leaf_tiny, @function
        .p2align 4
leaf_tiny:                              /* mov; inc; ret: one stub for both */
        mov 4(%esp), %eax
        inc %eax
        ret
        .size leaf_tiny, .-leaf_tiny

        .macro CHECKED fn
        mov $0x11111111, %eax
        movd %eax, %xmm0
        pshufd $0, %xmm0, %xmm0
        mov $0x22222222, %eax
        movd %eax, %xmm1
        pshufd $0, %xmm1, %xmm1
        mov $0x1111, %ecx
        mov $0x2222, %edx
        mov $0x3333, %ebx
        mov $0x4444, %esi
        mov $0x5555, %edi
        mov $0x6666, %ebp
        push $7
        call \fn
        add $4, %esp
        cmp $0x1111, %ecx
        jne 8f
        cmp $0x2222, %edx
        jne 8f
        cmp $0x3333, %ebx
        jne 8f
        cmp $0x4444, %esi
        jne 8f
        cmp $0x5555, %edi
        jne 8f
        cmp $0x6666, %ebp
        jne 8f
        mov $0x11111111, %eax
        movd %eax, %xmm2
        pshufd $0, %xmm2, %xmm2
        pcmpeqd %xmm0, %xmm2
        pmovmskb %xmm2, %eax
        cmp $0xffff, %eax
        jne 8f
        mov $0x22222222, %eax
        movd %eax, %xmm2
        pshufd $0, %xmm2, %xmm2
        pcmpeqd %xmm1, %xmm2
        pmovmskb %xmm2, %eax
        cmp $0xffff, %eax
        jne 8f
        xor %eax, %eax
        ret
8:      mov $1, %eax
        ret
        .endm

check_keep:
        CHECKED leaf_keep
check_tiny:
        CHECKED leaf_tiny

        .globl regcheck
        .type regcheck, @function
        .p2align 4
regcheck:
        push %ebp
        push %ebx
        push %esi
        push %edi
        sub $8, %esp                    /* [esp]: calls left, [esp+4]: calls that changed one */
        mov 28(%esp), %eax
        mov %eax, (%esp)
        movl $0, 4(%esp)
1:      cmpl $0, (%esp)
        je 9f
        call check_keep
        add %eax, 4(%esp)
        call check_tiny
        add %eax, 4(%esp)
        decl (%esp)
        jmp 1b
9:      mov 4(%esp), %eax
        add $8, %esp
        pop %edi
        pop %esi
        pop %ebx
        pop %ebp
        ret
        .size regcheck, .-regcheck

        .section .note.GNU-stack,"",@progbits
