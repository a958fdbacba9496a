/* Hand-written functions for the site analysis tests (tests/unit/test_sites.py).
   One function per verdict/reason; main() signals readiness and waits on stdin (live tests). */
        .intel_syntax noprefix
        .text

#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, .-name

/* RIP-relative mov at entry: relocatable (displacement re-aimed) -> jump */
FUNC(f_rip)
        mov     rax, qword ptr [rip + gvar]     /* 7 bytes */
        add     rax, 1
        ret
END(f_rip)

/* RIP-relative lea at entry -> jump */
FUNC(f_lea)
        lea     rax, [rip + gvar]
        ret
END(f_lea)

/* short jcc among the displaced bytes, target outside -> jump */
FUNC(f_jcc)
        test    edi, edi                        /* 2 */
        je      1f                              /* 2, short */
        mov     eax, 1                          /* 5 */
        ret
1:      xor     eax, eax
        ret
END(f_jcc)

/* direct call as the last displaced instruction -> jump */
FUNC(f_call_last)
        call    f_leaf                          /* 5 */
        add     eax, 1
        ret
END(f_call_last)

/* indirect call not last -> refused */
FUNC(f_icall)
        call    rdi                             /* 2 */
        mov     eax, 1                          /* 5 */
        ret
END(f_icall)

/* syscall not last -> refused */
FUNC(f_syscall)
        mov     eax, 39                         /* getpid, 5 bytes... */
        syscall                                 /* 2: site f_syscall+5 displaces it + mov */
        mov     rdx, rax                        /* 3 */
        mov     eax, 1
        ret
END(f_syscall)

/* a branch back to byte 2 of the entry -> refused */
FUNC(f_loop)
        xor     eax, eax                        /* 2 */
2:      add     eax, 1                          /* 3 */
        cmp     eax, edi
        jl      2b
        ret
END(f_loop)

/* int3 in the file at the entry -> refused (cannot relocate) */
FUNC(f_int3)
        int3
        nop
        nop
        nop
        nop
        ret
END(f_int3)

/* shorter than 5 bytes and followed at once by another function (no padding) -> refused */
        .p2align 4
        .globl f_tiny; .type f_tiny, @function
f_tiny:
        xor     eax, eax
        ret
        .size f_tiny, .-f_tiny
        .globl f_after_tiny; .type f_after_tiny, @function
f_after_tiny:
        mov     eax, 7
        ret
        .size f_after_tiny, .-f_after_tiny

/* shorter than 5 bytes, followed by alignment padding -> jump over the padding */
FUNC(f_tiny_padded)
        ret
END(f_tiny_padded)
        .p2align 5

/* jump table (gcc -fPIC shape) whose cases stay out of the entry -> jump */
FUNC(f_table_out)
        cmp     edi, 3                          /* 3 */
        ja      9f                              /* 2 */
        mov     edi, edi
        lea     rdx, [rip + .Ltab_out]
        movsxd  rax, dword ptr [rdx + rdi*4]
        add     rax, rdx
        jmp     rax
.Lo0:   mov     eax, 10
        ret
.Lo1:   mov     eax, 11
        ret
.Lo2:   mov     eax, 12
        ret
.Lo3:   mov     eax, 13
        ret
9:      xor     eax, eax
        ret
END(f_table_out)

/* jump table with a case landing at byte 2 of the entry -> refused */
FUNC(f_table_in)
        xor     eax, eax                        /* 2 */
.Li0:   add     eax, 1                          /* 3: case 0 lands here */
        cmp     edi, 2
        ja      9f
        mov     edi, edi
        lea     rdx, [rip + .Ltab_in]
        movsxd  rcx, dword ptr [rdx + rdi*4]
        add     rcx, rdx
        mov     edi, 3
        jmp     rcx
.Li1:   mov     eax, 21
        ret
.Li2:   mov     eax, 22
        ret
9:      ret
END(f_table_in)

/* jump through a computed address that is no table -> refused (unknown targets) */
FUNC(f_unknown)
        lea     rax, [rip + f_unknown]
        add     rax, rdi
        jmp     rax
END(f_unknown)

/* tail call through a pointer loaded from memory -> jump */
FUNC(f_tailptr)
        mov     rax, qword ptr [rdi]            /* 3 */
        add     rdi, 8                          /* 4 */
        jmp     rax
END(f_tailptr)

FUNC(f_leaf)
        mov     eax, 42
        ret
END(f_leaf)

/* code that no function symbol covers */
        .globl orphan_label
orphan_label:
        nop
        nop
        mov     eax, 1
        ret

FUNC(main)
        push    rbx
        sub     rsp, 16
        /* write(1, "ready\n", 6) */
        mov     edi, 1
        lea     rsi, [rip + ready]
        mov     edx, 6
        call    write@PLT
        /* read(0, buf, 1): wait until the test closes stdin */
        xor     edi, edi
        mov     rsi, rsp
        mov     edx, 1
        call    read@PLT
        call    f_rip
        add     rsp, 16
        pop     rbx
        xor     eax, eax
        ret
END(main)

        .section .rodata
        .p2align 2
.Ltab_out:
        .long   .Lo0 - .Ltab_out, .Lo1 - .Ltab_out, .Lo2 - .Ltab_out, .Lo3 - .Ltab_out
.Ltab_in:
        .long   .Li0 - .Ltab_in, .Li1 - .Ltab_in, .Li2 - .Ltab_in
ready:  .ascii  "ready\n"

        .data
        .p2align 3
        .globl gvar
gvar:   .quad   5

        .section .note.GNU-stack,"",@progbits
