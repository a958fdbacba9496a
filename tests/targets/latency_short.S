/* Short functions for latency probes (tests/live/test_latency.py). lat_overlap: the window of its
   first exit (jne + xor + ret) overlaps its entry window (test + jne + xor) without being its end:
   the entry window grows to the exit's end (test + jne + xor + ret), one stub does both.
   lat_noexit: its early return (xor + ret, a branch target 3 bytes from the ret) has no window of
   its own and its way in (test + je) only 4 bytes: no return probe, so no latency probe. */
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

        .globl lat_noexit
        .type lat_noexit, @function
        .p2align 4
lat_noexit:
        test %edi, %edi
        je 1f
        mov $7, %eax
        jmp 2f
1:      xor %eax, %eax
        ret
2:      add %edi, %eax
        ret
        .size lat_noexit, .-lat_noexit
        .section .note.GNU-stack,"",@progbits
