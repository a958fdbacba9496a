        .intel_syntax noprefix
        .text
/* One instruction per rule of the kernel's uprobe check (arch/x86/kernel/uprobes.c), never run:
   tests/live/test_traps.py places a uprobe on each and compares with x86/uprobe_rules.py. */
        .globl main
main:   sub rsp, 8
        mov edi, 100000
        call sleep
        add rsp, 8
        xor eax, eax
        ret
        .globl i_lock, i_cs, i_syscall, i_ud2, i_jmp66, i_plain, i_ds_jmp, i_int3, i_hlt, i_movss, i_vex, i_rep, i_fs, i_jcc66, i_call66, i_nop66
i_lock:  lock inc dword ptr [rdi]
i_cs:    .byte 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0
i_syscall: syscall
i_ud2:   ud2
i_jmp66: .byte 0x66, 0xe9, 0, 0
i_plain: mov eax, 1
i_ds_jmp: .byte 0x3e, 0xff, 0xe0
i_int3:  int3
i_hlt:   hlt
i_movss: mov ss, ax
i_vex:   vzeroupper
i_rep:   rep movsb
i_fs:    mov rax, qword ptr fs:[0x28]
i_jcc66: .byte 0x66, 0x0f, 0x84, 0, 0
i_call66: .byte 0x66, 0xe8, 0, 0
i_nop66: .byte 0x66, 0x90
        ret
        .section .note.GNU-stack,"",@progbits
