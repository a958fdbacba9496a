"""Policy-free system layer: ptrace, /proc memory and maps, remote syscalls (ctypes + stdlib)."""
