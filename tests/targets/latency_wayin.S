/* Functions whose entry window ends with the way into an exit block or with an exit (tests/live/test_latency.py),
   as glibc's free begins: `test rdi,rdi; je <a lone ret>`. The lone ret is a branch target with
   no room for a window of its own, so its exit is probed on the way in (a path window), which
   is the end of the entry window: one stub does the entry, the copy of the block and the exit. */
        .text
        .globl lat_wayin_far
        .type lat_wayin_far, @function
        .p2align 4
lat_wayin_far:                  /* test (3) + je rel32 (6): the path window is the je alone */
        test %rdi, %rdi
        {disp32} je 2f
        push %rbx
        lea 1(%rdi), %rbx
        mov %rbx, %rax
        jmp 3f
2:      ret                     /* between two branch targets: no window of its own */
3:      imul %rbx, %rax
        pop %rbx
        ret
        .size lat_wayin_far, .-lat_wayin_far

        .globl lat_wayin_near
        .type lat_wayin_near, @function
        .p2align 4
lat_wayin_near:                 /* test (3) + je rel8 (2): the path window is the entry window */
        test %rdi, %rdi
        je 2f
        lea 3(%rdi), %rax
        add %rdi, %rax
        ret
2:      ret
        .size lat_wayin_near, .-lat_wayin_near

        .globl lat_grow_ret
        .type lat_grow_ret, @function
        .p2align 4
lat_grow_ret:                   /* entry window mov+test ends inside the ret's window test+jne+ret:
                                   grown to mov+test+jne+ret, whose jne leaves the window */
        mov %rdi, %rax
        test $1, %dil
        jne 1f
        ret
1:      lea 7(%rdi,%rdi), %rax
        ret
        .size lat_grow_ret, .-lat_grow_ret

        .globl lat_grow_path
        .type lat_grow_path, @function
        .p2align 4
lat_grow_path:                  /* entry window mov+test ends inside the path window test+je
                                   (into the block mov+ret): grown to mov+test+je */
        mov %rdi, %r9
        test %rsi, %rsi
        je 2f
        lea 1(%rdi), %rax
        jmp 3f
2:      mov %r9, %rax
        ret
3:      imul %rsi, %rax
        ret
        .size lat_grow_path, .-lat_grow_path
        .section .note.GNU-stack,"",@progbits
