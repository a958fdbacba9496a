/* Shapes for short jumps through springboards (tests/unit/test_springboards.py): a jmp rel8 at a
   site where no jmp rel32 fits, to a jmp rel32 in the dead padding between functions. Between
   the shapes, a wall of 150 bytes of straight code keeps each one's padding out of the others'
   rel8 reach. Called by springboards_main.c. */
        .intel_syntax noprefix
        .text

#define FUNC(name) .globl name; .type name, @function; name:
#define END(name) .size name, .-name
#define WALL(name) FUNC(name) .cfi_startproc; .rept 50; add eax, 1; .endr; ret; .cfi_endproc; END(name)

/* long sb_near(int n): n down to 0 in a loop of 2-byte instructions, then 0. Branch targets at
   +2 and +8: +0, +4 and +6 take no jmp rel32 (a target inside its 5 bytes), a jmp rel8 fits;
   16 int3 after the ret are dead padding. */
        .p2align 4
FUNC(sb_near)
        .cfi_startproc
        test    edi, edi                /* +0 */
1:      jle     2f                      /* +2 */
        dec     edi                     /* +4 */
        jmp     1b                      /* +6 */
2:      xor     eax, eax                /* +8 */
        ret                             /* +10 */
        .cfi_endproc
END(sb_near)
        .skip   16, 0xcc

WALL(sb_wall1)

/* The same loop, but the function ends with a call of a function that returns: the nops after
   it are not dead (a return would run them), so no springboard. */
FUNC(sb_fall)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
2:      xor     eax, eax
        call    sb_returns
        .cfi_endproc
END(sb_fall)
        .skip   16, 0x90

WALL(sb_wall2)

/* Nops inside a function (between a jmp and a branch target): never used, even though no
   fall-through reaches them; and no padding after the function. */
FUNC(sb_inner)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
        .skip   12, 0x90
2:      xor     eax, eax
        ret
        .cfi_endproc
END(sb_inner)

WALL(sb_wall3)

/* Padding covered by the function's FDE (.cfi_endproc after it): not dead for us. */
FUNC(sb_fde)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
2:      xor     eax, eax
        ret
END(sb_fde)
        .skip   16, 0x90
        .cfi_endproc

WALL(sb_wall4)

/* Padding entered by a branch (sb_enter jumps 6 bytes into it, a label not in the symbol
   table): not dead. */
FUNC(sb_entered)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
2:      xor     eax, eax
        ret
        .cfi_endproc
END(sb_entered)
        .skip   6, 0x90
.Lentered_pad:
        .skip   10, 0x90

WALL(sb_wall5)

/* A label 3 bytes into the padding: the run stops there, 3 bytes are too few. */
FUNC(sb_label)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
2:      xor     eax, eax
        ret
        .cfi_endproc
END(sb_label)
        .skip   3, 0x90
sb_label_mark:
        .skip   13, 0x90

WALL(sb_wall6)

/* Ends with a call of a function that never returns: the padding after it is dead. */
FUNC(sb_noret)
        .cfi_startproc
        test    edi, edi
1:      jle     2f
        dec     edi
        jmp     1b
2:      xor     eax, eax
        call    sb_die
        .cfi_endproc
END(sb_noret)
        .skip   16, 0x90

WALL(sb_wall7)

FUNC(sb_die)
        .cfi_startproc
        ud2
        .cfi_endproc
END(sb_die)

FUNC(sb_returns)
        .cfi_startproc
        ret
        .cfi_endproc
END(sb_returns)

FUNC(sb_enter)
        .cfi_startproc
        test    edi, edi
        jne     .Lentered_pad
        ret
        .cfi_endproc
END(sb_enter)

        .section .note.GNU-stack,"",@progbits
