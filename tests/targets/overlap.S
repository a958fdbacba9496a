/* Functions whose entry windows hold several short instructions, so that probes at the entry
 * and at instructions inside its displaced bytes overlap. */
    .text
    .globl ov_f
    .type ov_f, @function
ov_f:                       /* returns 3 * (x + 1) + 5 * (x & 1) */
    push %rbx               /* ov_f+0: 1 byte */
    mov %edi, %ebx          /* ov_f+1: 2 bytes */
    inc %ebx                /* ov_f+3: 2 bytes (flags written) */
    mov %edi, %eax          /* ov_f+5: 2 bytes */
    and $1, %eax            /* ov_f+7: 3 bytes */
    lea (%eax,%eax,4), %eax /* ov_f+10: 3 bytes */
    lea (%ebx,%ebx,2), %ebx /* ov_f+13 */
    add %ebx, %eax
    pop %rbx
    ret
    .size ov_f, .-ov_f

    .globl ov_flags
    .type ov_flags, @function
ov_flags:                   /* returns x < 10 ? 1 : 2: the flags are live inside the window */
    cmp $10, %edi           /* ov_flags+0: 3 bytes */
    mov $1, %eax            /* ov_flags+3: 5 bytes, flags live across it */
    jl 1f
    mov $2, %eax
1:  ret
    .size ov_flags, .-ov_flags
    .section .note.GNU-stack,"",@progbits

/* Short functions whose exit windows overlap their entry windows. */
    .text
    .globl ov_short
    .type ov_short, @function
ov_short:                   /* returns x + 1: entry window = mov + inc, exit = ret after it */
    mov %edi, %eax          /* 2 bytes */
    inc %eax                /* 2 bytes */
    add $0, %eax            /* 3 bytes */
    ret
    .size ov_short, .-ov_short

    .globl ov_two
    .type ov_two, @function
ov_two:                     /* returns x < 0 ? 0 : x, two rets */
    test %edi, %edi         /* 2 bytes */
    js 1f                   /* 2 bytes */
    mov %edi, %eax          /* 2 bytes */
    ret
1:  mov $0, %eax            /* 5 bytes: this exit's window starts at the branch target */
    ret
    .size ov_two, .-ov_two

    .globl ov_tail
    .type ov_tail, @function
ov_tail:                    /* x < 0 ? ov_neg(x) (a conditional tail call) : x * 2 */
    cmp $0, %edi            /* 3 bytes */
    jl ov_neg               /* conditional tail call in the entry window */
    lea (%rdi,%rdi), %eax
    add $0, %eax
    add $0, %eax
    ret
    .size ov_tail, .-ov_tail

    .type ov_neg, @function
ov_neg:                     /* x + 1 */
    lea 1(%rdi), %eax
    ret
    .size ov_neg, .-ov_neg

    .globl ov_path
    .type ov_path, @function
ov_path:                    /* x == 0 ? 7 : x + 3: the branch into the short exit block is in the entry window */
    mov $7, %eax            /* 5 bytes */
    test %edi, %edi         /* 2 bytes */
    je 1f
    lea 3(%rdi), %eax
    add $0, %eax
    add $0, %eax
1:  ret
    .size ov_path, .-ov_path
    .section .note.GNU-stack,"",@progbits
