/* Hand-written functions for exit analysis and return probes (tests/unit/test_exits.py,
   tests/live/test_returns.py). Every function has an entry window and exit windows that do not
   overlap, so entry and return probes can be placed together. */
        .intel_syntax noprefix
        .text

#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, .-name

/* int x_three(int a): 3 if a >= 10, 2 if 5 <= a < 10, 1 below. Three rets; the second and the
   third are in blocks that begin at branch targets; the second's window must start at its target,
   the third (the last instruction) takes the alignment padding after it. */
FUNC(x_three)
        cmp     edi, 10                         /* +0, 3 */
        jl      1f                              /* +3, 2 */
        mov     eax, 3                          /* +5, 5 */
        ret                                     /* +10 exit 1: window [mov, ret] */
2:      mov     eax, 1                          /* +11, 5, branch target: the window starts here */
        ret                                     /* +16 exit 2 */
1:      cmp     edi, 5                          /* +17, 3, branch target */
        jl      2b                              /* +20, 2 */
        mov     eax, 2                          /* +22, 5 */
        ret                                     /* +27 exit 3: window [ret] + padding */
END(x_three)

/* int x_leaf(int a): 3 * a + 100 */
FUNC(x_leaf)
        lea     eax, [rdi + rdi*2]              /* 3 */
        add     eax, 100                        /* 3 */
        mov     edx, 1                          /* 5 */
        ret
END(x_leaf)

/* int x_tail(int a): x_leaf(a + 1), as a tail call (direct jmp rel32 to another function) */
FUNC(x_tail)
        mov     eax, edi                        /* 2 */
        add     eax, 1                          /* 3 */
        mov     edi, eax                        /* 2 */
        {disp32} jmp x_leaf                     /* 5: the exit window is the jmp alone */
END(x_tail)

/* int x_itail(int a): (*x_ptr)(a), a tail call through a pointer loaded from memory */
FUNC(x_itail)
        mov     ecx, 0                          /* 5: the entry window */
        mov     rax, qword ptr [rip + x_ptr]    /* 7 */
        jmp     rax                             /* 2: window [mov, jmp rax] */
END(x_itail)

/* int x_paths(int a): -1 if a < 0, 100 if a >= 100, else 3a + 1. Its only ret is at a branch
   target with nothing before it: three path windows catch it, ending with the js into it, with
   the instruction falling into it, and with the jmp into it. */
FUNC(x_paths)
        mov     eax, -1                         /* 5: the entry window */
        mov     edx, edi                        /* 2 */
        test    edx, edx                        /* 2 */
        js      1f                              /* 2: path window [mov edx; test; js] */
        cmp     edi, 100                        /* 3 */
        jge     2f                              /* 2 */
        lea     eax, [rdi + rdi*2]              /* 3 */
        add     eax, 1                          /* 3: path window [lea; add], falls into 1: */
1:      ret
2:      mov     eax, 100                        /* 5, branch target */
        jmp     1b                              /* 2: path window [mov eax, 100; jmp] */
END(x_paths)

/* int x_chain(int a): 0 if a <= 0, else 3a + 1. Its ret (not the last instruction) is entered
   by the add falling into it and by a jmp from a block that itself begins at a branch target too
   close to it: that path window ends with the jle and its stub copies both blocks. */
FUNC(x_chain)
        mov     eax, 7                          /* +0, 5: the entry window */
        mov     ecx, 1                          /* +5, 5 */
        test    edi, edi                        /* +10, 2 */
        jle     3f                              /* +12, 2: path window [mov ecx; test; jle] */
        imul    eax, edi, 3                     /* +14, 3 */
        add     eax, 1                          /* +17, 3: path window [imul; add] */
1:      ret                                     /* +20 */
3:      xor     eax, eax                        /* +21, branch target */
        jmp     1b                              /* +23 */
END(x_chain)

/* int x_deadpad(int a): a ? 9 : 5. The ret at 1: follows alignment nops after another ret: the
   nops are never run, so the jne is the only way in (one path window). */
FUNC(x_deadpad)
        mov     eax, 9                          /* +0, 5: the entry window */
        mov     ecx, 0                          /* +5, 5 */
        test    edi, edi                        /* +10, 2 */
        jne     1f                              /* +12, 2: path window [mov ecx; test; jne] */
        mov     eax, 5                          /* +14, 5 */
        ret                                     /* +19 */
        nop     dword ptr [rax]                 /* +20, 4: padding, never run */
1:      ret                                     /* +24 */
        ud2                                     /* not padding: the ret cannot borrow it */
END(x_deadpad)

/* int x_wrap(int a): x_leaf(a + 2), a wrapper: the entry window [add; jmp] ends with the tail
   call, so the exit takes that same window, acting at the first byte */
FUNC(x_wrap)
        add     edi, 2                          /* 3 */
        {disp32} jmp x_leaf                     /* 5 */
END(x_wrap)

/* ret imm16: a callee-pops function (never called from C, decoded only) */
FUNC(x_retimm)
        mov     eax, 1                          /* 5 */
        mov     ecx, 2                          /* 5 */
        ret     8                               /* 3 */
END(x_retimm)

/* a ret right after a branch target, too close to it (and not last: no padding): refused,
   naming that ret */
FUNC(x_short)
        test    edi, edi                        /* 2 */
        je      1f                              /* 2 */
        mov     eax, 7                          /* 5 */
        jmp     2f                              /* 2 */
1:      xor     eax, eax                        /* 2, branch target */
        ret                                     /* only 3 bytes from the target */
2:      mov     edx, 0                          /* 5, branch target */
        ret
END(x_short)

/* too short a function: 4 bytes in all (not the last in .text: no padding to borrow) */
FUNC(x_tiny)
        lea     eax, [rdi + 1]
        ret
END(x_tiny)
        .globl x_after; .type x_after, @function        /* right after it: no padding to take */
x_after:
        mov     eax, 1
        ret
END(x_after)

/* int x_condtail(int a): a + 1 ? x_leaf(a + 1) : 0, the call a conditional tail call (jne to
   another function): caught by a path window ending with the jne */
FUNC(x_condtail)
        mov     eax, edi                        /* 2 */
        add     eax, 1                          /* 3 */
        mov     edi, eax                        /* 2 */
        test    edi, edi
        jne     x_leaf
        xor     eax, eax
        mov     edx, 0
        ret
END(x_condtail)

/* a tail jump to its own start is a new call, so an exit */
FUNC(x_self)
        sub     edi, 1                          /* 3 */
        nop     dword ptr [rax]                 /* 4 */
        test    edi, edi                        /* 2 */
        jg      3f                              /* 2 */
        mov     eax, 5                          /* 5 */
        ret
3:
        nop     dword ptr [rax]                 /* 4 */
        jmp     x_self                          /* 5 */
END(x_self)

/* the last ret followed by alignment padding: the window may take the padding */
FUNC(x_padded)
        lea     eax, [rdi + 1]                  /* 3 */
        add     eax, edi                        /* 2 */
        jmp     1f                              /* 2 */
        ud2
1:      ret                                     /* branch target, last: window = ret + padding */
END(x_padded)
        nop
        nop
        nop
        nop
        nop
        nop
        nop
        nop

/* int x_dispatch(int a): 1 for even a, 2 for odd, through a table of pointers into itself (like
   CPython's sre dispatch): the indirect jump stays in the function, it is no tail call. */
FUNC(x_dispatch)
        and     edi, 1
        lea     rax, [rip + x_dispatch_table]
        jmp     qword ptr [rax + rdi*8]
.Lx_dispatch_even:
        mov     eax, 1
        ret
.Lx_dispatch_odd:
        mov     eax, 2
        ret
END(x_dispatch)

        .section .data.rel.local,"aw"
        .p2align 3
        .globl x_ptr
x_ptr:  .quad   x_leaf
x_dispatch_table:
        .quad   .Lx_dispatch_even, .Lx_dispatch_odd

        .section .note.GNU-stack,"",@progbits
