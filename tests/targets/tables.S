/* Jump tables and indirect jumps for the table analysis tests (tests/unit/test_tables.py,
   tests/live/test_tables_live.py): one function per shape. Called by tables_main.c. */
        .intel_syntax noprefix
        .text

#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, .-name

/* Two switches in one function, their tables back to back (tab_a then tab_b). The first is
   guarded on memory only (cmp dword ptr [rdi], 3; ja; then the index is loaded from there, as
   liblzma's lzma_code does): read past its 4 entries, tab_b's would be taken as cases of tab_a,
   landing 16 bytes before tab_b's cases (t_two_mid+1: inside an instruction).
   int t_two(const int sel[2]): 10 + sel[0] (or 14), then + 0x4000, then + 1, 2 or 3 (or 9). */
FUNC(t_two)
        cmp     dword ptr [rdi], 3
        ja      .La_def
        mov     eax, dword ptr [rdi]
        lea     rdx, [rip + tab_a]
        movsxd  rax, dword ptr [rdx + rax*4]
        add     rax, rdx
        jmp     rax
.La0:   mov     eax, 10
        jmp     .Lsecond
.La1:   mov     eax, 11
        jmp     .Lsecond
.La2:   mov     eax, 12
        jmp     .Lsecond
.La3:   mov     eax, 13
        jmp     .Lsecond
.La_def:
        mov     eax, 14
.Lsecond:
        add     eax, 0x1000                     /* 5 bytes each: S, S+5, S+10, S+15 */
        add     eax, 0x1000
        add     eax, 0x1000
        add     eax, 0x1000
        jmp     .Lb_dispatch                    /* S+20, 2 bytes */
.Lb0:   add     eax, 1                          /* S+22: tab_a + tab_b[0] = S+6 */
        ret
.Lb1:   add     eax, 2
        ret
.Lb2:   add     eax, 3
        ret
.Lb_dispatch:
        mov     ecx, dword ptr [rdi + 4]
        cmp     ecx, 2
        ja      .Lb_def
        lea     rdx, [rip + tab_b]
        movsxd  rcx, dword ptr [rdx + rcx*4]
        add     rcx, rdx
        jmp     rcx
.Lb_def:
        add     eax, 9
        ret
END(t_two)

/* A switch in a loop whose table base is set once before the loop, in another block; the
   out-of-range case calls a function that never returns, and the code after that call (never
   reached) clobbers rdx before joining the loop (printf_positional's calls of __assert_fail).
   int t_loop(const int *v, int n): sum of 1, 10 or 100 per element (0, 1, 2). */
FUNC(t_loop)
        xor     eax, eax
        test    esi, esi
        jle     .Lloop_done
        lea     rdx, [rip + tab_c]
        xor     ecx, ecx
.Lloop_head:
        mov     r8d, dword ptr [rdi + rcx*4]
        cmp     r8d, 2
        ja      .Lloop_bad
        movsxd  r8, dword ptr [rdx + r8*4]
        add     r8, rdx
        jmp     r8
.Lc0:   add     eax, 1
        jmp     .Lloop_next
.Lc1:   add     eax, 10
        jmp     .Lloop_next
.Lloop_bad:
        mov     edi, 97
        call    t_die
        imul    rdx, rdx, 3                     /* after a call that never returns: dead */
        jmp     .Lloop_next
.Lc2:   add     eax, 100
.Lloop_next:
        add     rcx, 1                          /* 4 bytes */
        cmp     ecx, esi                        /* 2 */
        jl      .Lloop_head
.Lloop_done:
        ret
END(t_loop)

/* never returns: exit_group(edi) */
FUNC(t_die)
        mov     eax, 231
        syscall
        ud2
END(t_die)

/* A table of one entry, read RIP-relative (__res_context_query).
   long t_one(long x): x + 5 */
FUNC(t_one)
        movsxd  rax, dword ptr [rip + tab_one]
        lea     rdx, [rip + tab_one]
        add     rax, rdx
        jmp     rax
        nop
        nop
.Lone:  lea     rax, [rdi + 5]
        add     rax, 0
        ret
END(t_one)

/* A tail call through a function-pointer argument, also entered from t_tail0 with the pointer
   zeroed (xdr_union): the jump lands only on addresses the program takes.
   long t_tail(long (*f)(long), long x): f(x), or -1 for a null f. */
FUNC(t_tail)
        test    rdi, rdi
        je      .Ltail_null
        mov     rax, rdi
        mov     rdi, rsi
        jmp     rax
.Ltail_null:
        mov     rax, -1
        ret
END(t_tail)

/* long t_tail0(long x): t_tail(NULL, x) */
FUNC(t_tail0)
        mov     rsi, rdi
        xor     edi, edi
        jmp     t_tail
END(t_tail0)

/* A computed jump into blocks of 8 bytes (index * 8 + base): no table, targets unknown; it must
   stay refused. long t_computed(long i): 100 + i for i in 0..2 */
FUNC(t_computed)
        and     edi, 3
        lea     rax, [rip + .Lblocks]
        lea     rax, [rax + rdi*8]
        jmp     rax
        .p2align 3
.Lblocks:
        mov     eax, 100                        /* 5 */
        ret                                     /* 1 */
        nop
        nop
        mov     eax, 101
        ret
        nop
        nop
        mov     eax, 102
        ret
        nop
        nop
        mov     eax, 103
        ret
END(t_computed)

/* The guard compares the element the index is then loaded from, addressed through another
   register (ast2obj_expr: lea rsi, [rax + 4]; cmp dword ptr [rdx + rax*4 + 16], N; ja; mov edx,
   [rdx + rsi*4]). int t_memidx(const int *v, long i): 20 + v[i + 4] for v[i + 4] in 0..2, else 0 */
FUNC(t_memidx)
        lea     rsi, [rsi + 4]
        xor     eax, eax
        cmp     dword ptr [rdi + rsi*4], 2
        ja      .Lm_def
        lea     rax, [rsi - 4]
        lea     rsi, [rax + 4]
        cmp     dword ptr [rdi + rax*4 + 16], 2
        ja      .Lm_def
        mov     ecx, dword ptr [rdi + rsi*4]
        lea     r8, [rip + tab_d]
        movsxd  rcx, dword ptr [r8 + rcx*4]
        add     rcx, r8
        jmp     rcx
.Lm0:   mov     eax, 20
        ret
.Lm1:   mov     eax, 21
        ret
.Lm2:   mov     eax, 22
.Lm_def:
        ret
END(t_memidx)

        .section .rodata
        .p2align 2
        .globl tab_a, tab_b, tab_c, tab_one, tab_d
        .type tab_a, @object
tab_a:  .long .La0 - tab_a, .La1 - tab_a, .La2 - tab_a, .La3 - tab_a
        .size tab_a, .-tab_a
        .type tab_b, @object
tab_b:  .long .Lb0 - tab_b, .Lb1 - tab_b, .Lb2 - tab_b
        .size tab_b, .-tab_b
        .type tab_c, @object
tab_c:  .long .Lc0 - tab_c, .Lc1 - tab_c, .Lc2 - tab_c
        .size tab_c, .-tab_c
        .type tab_one, @object
tab_one: .long .Lone - tab_one
        .size tab_one, .-tab_one

        .type tab_d, @object
tab_d:  .long .Lm0 - tab_d, .Lm1 - tab_d, .Lm2 - tab_d
        .size tab_d, .-tab_d

        .section .note.GNU-stack,"",@progbits
