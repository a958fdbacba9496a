/* i386 PIC jump tables of the forms sites/tables32.py reads (tests/unit/test_i386_tables.py). */
    .text
    .globl sw_got
    .type sw_got,@function
sw_got:                     /* gcc's -fPIC switch: entries case@GOTOFF, G = ebx from the thunk */
    pushl %ebx
    call thunk_bx
    addl $_GLOBAL_OFFSET_TABLE_, %ebx
    movl 8(%esp), %eax
    cmpl $3, %eax
    ja sw_got_default
    movl sw_got_table@GOTOFF(%ebx,%eax,4), %eax
    addl %ebx, %eax
    jmp *%eax
    .globl sw_got_c0
sw_got_c0:
    movl $10, %eax
    popl %ebx
    ret
    .globl sw_got_c1
sw_got_c1:
    movl $11, %eax
    popl %ebx
    ret
    .globl sw_got_c2
sw_got_c2:
    movl $12, %eax
    popl %ebx
    ret
    .globl sw_got_default
sw_got_default:
    movl $-1, %eax
    popl %ebx
    ret
    .size sw_got,.-sw_got

    .globl sw_spill
    .type sw_spill,@function
sw_spill:                   /* the PIC register reloaded from the stack: G taken as the GOT */
    pushl %edi
    pushl %ebx
    subl $8, %esp
    call thunk_bx
    addl $_GLOBAL_OFFSET_TABLE_, %ebx
    movl %ebx, 4(%esp)
    movl 20(%esp), %ecx
    cmpl $2, %ecx
    ja sw_spill_default
    movl 4(%esp), %edi
    addl sw_spill_table@GOTOFF(%edi,%ecx,4), %edi
    jmp *%edi
    .globl sw_spill_c0
sw_spill_c0:
    movl $20, %eax
    jmp sw_spill_out
    .globl sw_spill_c1
sw_spill_c1:
    movl $21, %eax
    jmp sw_spill_out
    .globl sw_spill_c2
sw_spill_c2:
    nop
    movl $22, %eax
    jmp sw_spill_out
    .globl sw_spill_default
sw_spill_default:
    movl $-1, %eax
sw_spill_out:
    addl $8, %esp
    popl %ebx
    popl %edi
    ret
    .size sw_spill,.-sw_spill

    .globl sw_self
    .type sw_self,@function
sw_self:                    /* glibc's BRANCH_TO_JMPTBL_ENTRY: entries relative to the table, no guard */
    pushl %ebx
    movl 8(%esp), %ecx
    bsfl %ecx, %ecx
    call thunk_bx
    addl $_GLOBAL_OFFSET_TABLE_, %ebx
    leal sw_self_table@GOTOFF(%ebx), %ebx
    addl (%ebx,%ecx,4), %ebx
    jmp *%ebx
    .globl sw_self_c0
sw_self_c0:
    movl $30, %eax
    popl %ebx
    ret
    .globl sw_self_c1
sw_self_c1:
    movl $31, %eax
    popl %ebx
    ret
    .size sw_self,.-sw_self

    .globl sw_unguarded_spill
    .type sw_unguarded_spill,@function
sw_unguarded_spill:         /* no guard and G unknown: stays unknown (its sites refused) */
    pushl %edi
    movl 8(%esp), %edi
    movl 12(%esp), %ecx
    movl sw_got_table@GOTOFF(%edi,%ecx,4), %eax
    addl %edi, %eax
    popl %edi
    jmp *%eax
    .size sw_unguarded_spill,.-sw_unguarded_spill

thunk_bx:
    movl (%esp), %ebx
    ret

    .section .rodata
    .align 4
sw_got_table:
    .long sw_got_c0@GOTOFF, sw_got_c1@GOTOFF, sw_got_c2@GOTOFF, sw_got_default@GOTOFF
sw_spill_table:
    .long sw_spill_c0@GOTOFF, sw_spill_c1@GOTOFF, sw_spill_c2@GOTOFF
sw_self_table:
    .long sw_self_c0 - sw_self_table, sw_self_c1 - sw_self_table
    .section .note.GNU-stack,"",@progbits
