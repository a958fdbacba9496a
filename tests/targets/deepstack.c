/* A signal handler that blocks with a deep frame, having made its thread resume somewhere chosen.
 *
 * A spinner thread runs spin(): a loop through the asm site deep_site, four short instructions
 * (4 + 4 + 8 + 7 bytes; the site's displaced bytes are the first two, deep_site + 4 is an
 * instruction boundary strictly inside them).
 *
 * The tracer writes the address to resume at in the global resume_at (through /proc/PID/mem: the
 * value must be on no stack but the signal frame's). Commands, one per line on stdin:
 *   go MODE DEPTH         the main thread sends SIGUSR1 to the spinner. Its handler rewrites the
 *                         saved rip to resume_at and the saved rsp to spin's,
 *                         then (MODE normal, alt) allocas DEPTH bytes, touches them, prints
 *                         "blocked" and blocks until "release". MODE normal: the handler runs on
 *                         the thread's stack; alt: on its alternate signal stack (1 MiB, mmap'd);
 *                         nested: the SIGUSR1 handler runs on the thread's stack and raises
 *                         SIGUSR2, whose handler runs on the alternate stack and does the alloca
 *                         and the blocking.
 *   release               the handler returns; answers "released ITERS" once the spinner has gone
 *                         round its loop again.
 *   finish                the spinner stops; answers "done ITERS" and exits 0.
 */
#define _GNU_SOURCE
#include <alloca.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

volatile long iters;
volatile int stop_flag;
volatile uintptr_t spin_rsp;
volatile uintptr_t resume_at;
extern char deep_site[];
long spin(void);

__asm__(
    ".intel_syntax noprefix\n"
    ".text\n"
    ".globl spin; .type spin, @function; .p2align 4\n"
    "spin:\n"
    "        mov     qword ptr [rip + spin_rsp], rsp\n"
    "        xor     eax, eax\n"
    "        xor     edx, edx\n"
    ".globl deep_site\n"
    "deep_site:\n"
    "        add     rax, 1\n"                       /* 4 */
    "        add     rdx, 1\n"                       /* 4 */
    "        add     qword ptr [rip + iters], 1\n"   /* 8 */
    "        cmp     dword ptr [rip + stop_flag], 0\n" /* 7 */
    "        je      deep_site\n"
    "        ret\n"
    ".size spin, .-spin\n"
    ".att_syntax prefix\n");

static int release_pipe[2];
static volatile size_t depth;
static pthread_t spinner;
static volatile pid_t spinner_tid;
static void *altstack;
#define ALTSTACK_SIZE (1 << 20)

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

static void block_deep(void) {
    volatile char *frame = alloca(depth);
    memset((char *)frame, 0x5a, depth);  /* touch it all: the frame really is this deep */
    say("blocked\n");
    char c;
    while (read(release_pipe[0], &c, 1) < 0) {}
    if (frame[depth - 1] != 0x5a) abort();
}

static void redirect(void *uc_) {
    ucontext_t *uc = uc_;
    uc->uc_mcontext.gregs[REG_RIP] = (greg_t)resume_at;
    uc->uc_mcontext.gregs[REG_RSP] = (greg_t)spin_rsp;
}

static void on_usr1(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si;
    redirect(uc);
    block_deep();
}

static void on_usr1_nested(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si;
    redirect(uc);
    syscall(SYS_tgkill, getpid(), spinner_tid, SIGUSR2);  /* taken on the way out of tgkill */
}

static void on_usr2(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si; (void)uc;
    block_deep();
}

static void *spin_thread(void *arg) {
    (void)arg;
    stack_t ss = {.ss_sp = altstack, .ss_size = ALTSTACK_SIZE, .ss_flags = 0};
    if (sigaltstack(&ss, NULL)) { perror("sigaltstack"); exit(2); }
    spinner_tid = (pid_t)syscall(SYS_gettid);
    return (void *)spin();
}

static void handle(int sig, void (*fn)(int, siginfo_t *, void *), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fn;
    sa.sa_flags = SA_SIGINFO | flags;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static void wait_rounds(long from) {
    while (iters < from + 1000) usleep(100);
}

int main(void) {
    if (pipe(release_pipe)) return 2;
    altstack = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (altstack == MAP_FAILED) return 2;
    pthread_create(&spinner, NULL, spin_thread, NULL);
    while (!spinner_tid) usleep(100);
    wait_rounds(0);
    printf("ready %d %d %p %p %p\n", getpid(), spinner_tid, altstack, (void *)deep_site, (void *)&resume_at);
    fflush(stdout);
    char line[256], mode[32];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long d;
        if (sscanf(line, "go %31s %lu", mode, &d) == 2) {
            depth = d;
            if (strcmp(mode, "normal") == 0) {
                handle(SIGUSR1, on_usr1, 0);
            } else if (strcmp(mode, "alt") == 0) {
                handle(SIGUSR1, on_usr1, SA_ONSTACK);
            } else if (strcmp(mode, "nested") == 0) {
                handle(SIGUSR1, on_usr1_nested, 0);
                handle(SIGUSR2, on_usr2, SA_ONSTACK);
            } else {
                say("bad mode\n");
                return 2;
            }
            pthread_kill(spinner, SIGUSR1);
        } else if (strncmp(line, "release", 7) == 0) {
            long before = iters;
            (void)!write(release_pipe[1], "x", 1);
            wait_rounds(before);
            printf("released %ld\n", iters);
            fflush(stdout);
        } else if (strncmp(line, "finish", 6) == 0) {
            stop_flag = 1;
            void *ret;
            pthread_join(spinner, &ret);
            printf("done %ld\n", iters);
            fflush(stdout);
            return 0;
        }
    }
    return 3;
}
