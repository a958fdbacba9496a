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
