/* Functions whose entry takes no jump, one per reason, for the trap fallback
   (tests/live/test_traps.py); traps_main.c calls them from several threads. */
        .intel_syntax noprefix
        .text

#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, .-name

/* a branch lands at byte 2 of the entry: int t_branch_into(int n >= 1) returns 0 */
FUNC(t_branch_into)
        mov     eax, edi                        /* 2 */
1:      dec     eax                             /* the loop comes back here */
        jnz     1b
        ret
END(t_branch_into)

/* a jump-table case lands at byte 2 of the entry: int t_jumptable(unsigned k <= 2) */
FUNC(t_jumptable)
        xor     eax, eax                        /* 2 */
.Lj0:   add     eax, 1                          /* case 0 lands here */
        cmp     edi, 2
        ja      9f
        mov     edi, edi
        lea     rdx, [rip + .Ltab]
        movsxd  rcx, dword ptr [rdx + rdi*4]
        add     rcx, rdx
        mov     edi, 3
        jmp     rcx
.Lj1:   mov     eax, 21
        ret
.Lj2:   mov     eax, 22
        ret
9:      ret
END(t_jumptable)

/* a 2-byte call is not the last displaced instruction: int t_call_mid(int (*f)(void)) */
FUNC(t_call_mid)
        call    rdi                             /* 2 */
        mov     eax, 5                          /* 5 */
        ret
END(t_call_mid)

FUNC(t_leaf)
        mov     eax, 42
        ret
END(t_leaf)

/* shorter than 5 bytes, followed at once by another function:
   int t_args(a, b, c, d, e, f) = a + b */
        .p2align 4
        .globl t_args; .type t_args, @function
t_args:
        lea     eax, [rdi + rsi]                /* 3 */
        ret
        .size t_args, .-t_args
/* shorter than 5 bytes too, and a lock prefix: no jump and no uprobe: void t_neither(int *p) */
        .globl t_neither; .type t_neither, @function
t_neither:
        lock inc dword ptr [rdi]                /* 3 */
        ret
        .size t_neither, .-t_neither
        .globl t_after; .type t_after, @function
t_after:
        mov     eax, 7
        ret
        .size t_after, .-t_after

        .section .rodata
        .p2align 2
.Ltab:
        .long   .Lj0 - .Ltab, .Lj1 - .Ltab, .Lj2 - .Ltab

        .section .note.GNU-stack,"",@progbits
