# Functions whose probe sites need care: live flags, live red zone, RIP-relative operands,
# short branches, a last call among the displaced instructions. Called from behave_main.c.
        .text

        .globl flags_live
        .type flags_live, @function
flags_live:                     # site flags_live+3: flags set by cmp are read by jl after the site
        cmp %rsi, %rdi
        mov %rdi, %rax
        mov %rsi, %rdx
        jl 1f
        sub %rsi, %rax
        ret
1:      add %rdx, %rax
        ret
        .size flags_live, .-flags_live

        .globl redzone_live
        .type redzone_live, @function
redzone_live:                   # site redzone_live+5: data below rsp is read after the site
        mov %rdi, -8(%rsp)
        mov %rsi, -16(%rsp)
        mov $7, %rax
        add -8(%rsp), %rax
        imul -16(%rsp), %rax
        ret
        .size redzone_live, .-redzone_live

        .globl riprel
        .type riprel, @function
riprel:                         # entry site: lea rip-relative; riprel+7: mov rip-relative load
        lea table(%rip), %rcx
        mov bias(%rip), %rax
        and $7, %rdi
        add (%rcx,%rdi,8), %rax
        ret
        .size riprel, .-riprel

        .globl shortbranch
        .type shortbranch, @function
shortbranch:                    # entry site: test + jz rel8 (5 bytes)
        test %rdi, %rdi
        jz 1f
        lea 1(%rdi,%rdi), %rax
        ret
1:      mov $1000, %eax
        ret
        .size shortbranch, .-shortbranch

        .globl helper
        .type helper, @function
helper:
        lea 100(%rdi), %rax
        ret
        .size helper, .-helper

        .globl lastcall
        .type lastcall, @function
lastcall:                       # site lastcall+1: mov (3 bytes) then call rel32 (last displaced)
        push %rbx
        mov %rdi, %rbx
        call helper
        add %rbx, %rax
        pop %rbx
        ret
        .size lastcall, .-lastcall

        .data
        .align 8
table:  .quad 3, 1, 4, 1, 5, 9, 2, 6
bias:   .quad 1000000
        .section .note.GNU-stack,"",@progbits
