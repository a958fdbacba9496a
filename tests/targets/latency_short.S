/* A function too short for a latency probe (tests/live/test_latency.py): the window of its first
   exit (jne + xor + ret) overlaps its entry window (test + jne + xor) without being its end. */
        .text
        .globl lat_overlap
        .type lat_overlap, @function
        .p2align 4
lat_overlap:
        test %edi, %edi
        jne 1f
        xor %eax, %eax
        ret
1:      lea 1(%rdi), %eax
        add $2, %eax
        ret
        .size lat_overlap, .-lat_overlap
        .section .note.GNU-stack,"",@progbits
