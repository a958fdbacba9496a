/* A counting breakpoint through ptrace, done the way a debugger does it.
 *
 *   ptrace_count SYMBOL_OFFSET INSN_LEN HITSFILE -- PROGRAM ARGS...
 *
 * Runs PROGRAM under ptrace with an int3 at load base + SYMBOL_OFFSET (a PIE executable: the
 * symbol's address in the file) and counts the traps, in every thread. Each hit is stepped over
 * "displaced", as gdb does: the original instruction (INSN_LEN bytes, not RIP-relative and not a
 * branch) is copied to a scratch place (the program's ELF entry point, dead once main runs: it
 * is written at the first hit, after the startup code has run), the
 * thread is single-stepped there and put back after the instruction. The breakpoint stays in
 * place the whole time, so no other thread can run past it unseen. The count goes to HITSFILE.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_TIDS 256
static pid_t stepping[MAX_TIDS];

static int is_stepping(pid_t tid, int clear) {
    for (int i = 0; i < MAX_TIDS; i++)
        if (stepping[i] == tid) {
            if (clear) stepping[i] = 0;
            return 1;
        }
    return 0;
}

static void set_stepping(pid_t tid) {
    for (int i = 0; i < MAX_TIDS; i++)
        if (stepping[i] == 0) { stepping[i] = tid; return; }
    fprintf(stderr, "ptrace_count: too many threads\n");
    exit(1);
}

static void die(const char *what) { perror(what); exit(1); }

static void poke_bytes(pid_t pid, uintptr_t addr, const unsigned char *bytes, size_t n) {
    for (size_t done = 0; done < n;) {
        uintptr_t word_addr = (addr + done) & ~(uintptr_t)7;
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, pid, (void *)word_addr, 0);
        if (errno) die("PEEKTEXT");
        unsigned char *w = (unsigned char *)&word;
        for (size_t k = (addr + done) - word_addr; k < 8 && done < n; k++) w[k] = bytes[done++];
        if (ptrace(PTRACE_POKETEXT, pid, (void *)word_addr, (void *)word) < 0) die("POKETEXT");
    }
}

static void peek_bytes(pid_t pid, uintptr_t addr, unsigned char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uintptr_t word_addr = (addr + i) & ~(uintptr_t)7;
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, pid, (void *)word_addr, 0);
        if (errno) die("PEEKTEXT");
        bytes[i] = ((unsigned char *)&word)[(addr + i) - word_addr];
    }
}

static uintptr_t load_base(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) die("maps");
    unsigned long start = 0;
    if (fscanf(f, "%lx", &start) != 1) die("maps parse");
    fclose(f);
    return start;
}

static uintptr_t entry_point(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/auxv", pid);
    FILE *f = fopen(path, "r");
    if (!f) die("auxv");
    Elf64_auxv_t a;
    uintptr_t entry = 0;
    while (fread(&a, sizeof a, 1, f) == 1)
        if (a.a_type == AT_ENTRY) entry = a.a_un.a_val;
    fclose(f);
    return entry;
}

int main(int argc, char **argv) {
    if (argc < 6 || strcmp(argv[4], "--") != 0) {
        fprintf(stderr, "usage: %s SYMBOL_OFFSET INSN_LEN HITSFILE -- PROGRAM ARGS...\n", argv[0]);
        return 2;
    }
    uintptr_t offset = strtoul(argv[1], NULL, 0);
    size_t insn_len = strtoul(argv[2], NULL, 0);
    const char *hits_file = argv[3];
    if (insn_len < 1 || insn_len > 15) return 2;

    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0) die("TRACEME");
        execv(argv[5], &argv[5]);
        die("execv");
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFSTOPPED(status)) die("exec stop");
    if (ptrace(PTRACE_SETOPTIONS, pid, 0, (void *)(long)(PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL)) < 0)
        die("SETOPTIONS");

    uintptr_t addr = load_base(pid) + offset;
    uintptr_t scratch = entry_point(pid);
    unsigned char orig[16], int3 = 0xcc;
    peek_bytes(pid, addr, orig, insn_len);
    poke_bytes(pid, addr, &int3, 1);
    int scratch_ready = 0; /* written at the first hit: _start has run by then */

    long hits = 0;
    int exit_code = 1;
    if (ptrace(PTRACE_CONT, pid, 0, 0) < 0) die("CONT");
    for (;;) {
        pid_t tid = waitpid(-1, &status, __WALL);
        if (tid < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            if (tid == pid) {
                exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                break;
            }
            continue;
        }
        if (!WIFSTOPPED(status)) continue;
        int sig = WSTOPSIG(status);
        if (status >> 16) { /* PTRACE_EVENT_CLONE: the new thread reports its own SIGSTOP */
            ptrace(PTRACE_CONT, tid, 0, 0);
            continue;
        }
        if (sig == SIGTRAP) {
            struct user_regs_struct regs;
            if (ptrace(PTRACE_GETREGS, tid, 0, &regs) < 0) die("GETREGS");
            if (is_stepping(tid, 1)) { /* the displaced instruction ran: back after it */
                regs.rip = regs.rip - scratch + addr;
                if (ptrace(PTRACE_SETREGS, tid, 0, &regs) < 0) die("SETREGS");
                ptrace(PTRACE_CONT, tid, 0, 0);
            } else if (regs.rip == addr + 1) {
                hits++;
                if (!scratch_ready) {
                    poke_bytes(tid, scratch, orig, insn_len);
                    scratch_ready = 1;
                }
                regs.rip = scratch;
                if (ptrace(PTRACE_SETREGS, tid, 0, &regs) < 0) die("SETREGS");
                set_stepping(tid);
                ptrace(PTRACE_SINGLESTEP, tid, 0, 0);
            } else {
                ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig);
            }
            continue;
        }
        if (sig == SIGSTOP) { /* a new thread's first stop (or a real SIGSTOP: let it go on) */
            ptrace(PTRACE_CONT, tid, 0, 0);
            continue;
        }
        ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig);
    }
    FILE *f = fopen(hits_file, "w");
    if (!f) die(hits_file);
    fprintf(f, "%ld\n", hits);
    fclose(f);
    return exit_code;
}
