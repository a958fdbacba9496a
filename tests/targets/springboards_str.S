/* A function whose entry takes no jmp rel32 (a branch lands 3 bytes in) but a jmp rel8 to a
   springboard in the padding after it (tests/live/test_springboards_kinds.py). Called by
   springboards_str_main.c.

   long sb_str(const char *s, long n): n down to 0 in a loop, then 0. +0 (test rsi, rsi: 3 bytes)
   is a short-jump site: the loop's jle at +3 is a branch target. */
        .intel_syntax noprefix
        .text
        .p2align 4
        .globl sb_str
        .type sb_str, @function
sb_str:
        .cfi_startproc
        test    rsi, rsi                /* +0 */
1:      jle     2f                      /* +3 */
        dec     rsi                     /* +5 */
        jmp     1b                      /* +8 */
2:      xor     eax, eax                /* +10 */
        ret                             /* +12 */
        .cfi_endproc
        .size sb_str, .-sb_str
        .skip   16, 0xcc
        .section .note.GNU-stack,"",@progbits

/* int sb_exit(int n): 2n if n > 0, else 0. Its first exit (+11, not the last instruction)
   begins at a branch target 3 bytes before its end, and the only path window (the jle at +2)
   would be 4 bytes from the entry: no jmp rel32 catches it; a jmp rel8 does. */
        .text
        .p2align 4
        .globl sb_exit
        .type sb_exit, @function
sb_exit:
        .cfi_startproc
        test    edi, edi                /* +0 */
        jle     1f                      /* +2 */
        lea     eax, [rdi + rdi]        /* +4 */
        jmp     2f                      /* +7 */
1:      xor     eax, eax                /* +9 */
        ret                             /* +11 */
2:      add     eax, 0                  /* +12 */
        ret                             /* +15 */
        .cfi_endproc
        .size sb_exit, .-sb_exit
        .skip   16, 0xcc
        .section .note.GNU-stack,"",@progbits

/* long sb_share(int n): n down to 0, then 0. +0 takes no jmp rel32 (the loop's target at +3);
   its short window is push rbx and mov ebx, edi ([+0, +3)), so a probe at +1 joins its stub. */
        .text
        .p2align 4
        .globl sb_share
        .type sb_share, @function
sb_share:
        .cfi_startproc
        push    rbx                     /* +0 */
        mov     ebx, edi                /* +1 */
1:      test    ebx, ebx                /* +3 */
        jle     2f                      /* +5 */
        dec     ebx                     /* +7 */
        jmp     1b                      /* +9 */
2:      xor     eax, eax                /* +11 */
        pop     rbx                     /* +13 */
        ret                             /* +14 */
        .cfi_endproc
        .size sb_share, .-sb_share
        .skip   16, 0xcc
        .section .note.GNU-stack,"",@progbits
