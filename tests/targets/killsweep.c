/* djprobe killsweep target: threads in every state call the probed f_* functions
 * (killsweep_funcs.c) and check every result against an unprobed reference.
 *   - WORKERS busy threads in a loop of calls;
 *   - one thread in nanosleep most of the time (calls between sleeps);
 *   - one thread sending itself SIGUSR2 in a loop; the handler calls and checks too;
 *     it also sends SIGUSR2 to the workers now and then (signal frames on their stacks);
 *   - the main thread blocked in read(0).
 * Prints "ready <address of f_add>" once every thread has run. Reads stdin: "s" prints
 * "status <iterations> <wrong>"; any other byte or EOF stops it, then it prints "ok <iterations>"
 * and exits 0 if every result was right, else "bad <wrong> of <iterations>" and exits 1.
 * A fault (SIGSEGV, SIGTRAP, SIGILL, SIGBUS, SIGFPE) prints "fault <signal> rip <rip> addr
 * <si_addr> tid <tid>" and exits with 128 + the signal. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 5

long f_add(long a, long b);
long f_mul(long a, long b);
long f_flags(long x, long y);
long f_red(long x);
long f_call(long x);

static long r_add(long a, long b) { long s = a + b; long t = s ^ (a >> 5); return t + (s << 1) - b; }
static long r_mul(long a, long b) { long p = a * 31 + b; long q = p * (b | 1); return q - (p >> 7) + 3; }
static long r_flags(long x, long y) {
    long r = x - y;
    long s = (x < y) ? r * 2 : r + 5;
    return s + (x == y) + ((unsigned long)x > (unsigned long)y ? 11 : 0);
}
static long r_red(long x) { return x + 2 * (x + 1) + 3 * (x * 2) + 4 * (x ^ 3) + 5 * (x - 4) + 6 * ~x; }
static long r_call(long x) { return r_add(x, 7) * 2 + 1; }

static volatile int stop;
static volatile long started, iters, bad, handled;
static pthread_t workers[WORKERS];

/* one round of calls, each checked; returns the number of wrong results */
static long check_round(long i, long t) {
    long x = i * 2654435761L + t, y = (i >> 2) - t, wrong = 0;
    if (f_add(x, y) != r_add(x, y)) wrong++;
    if (f_mul(x, y) != r_mul(x, y)) wrong++;
    if (f_flags(x, y) != r_flags(x, y)) wrong++;
    if (f_flags(y, y) != r_flags(y, y)) wrong++;
    if (f_red(x) != r_red(x)) wrong++;
    if (f_call(x) != r_call(x)) wrong++;
    return wrong;
}

static void on_usr2(int sig) {
    (void)sig;
    static __thread long n;
    long w = check_round(++n, 1000);
    if (w) __atomic_add_fetch(&bad, w, __ATOMIC_RELAXED);
    __atomic_add_fetch(&handled, 1, __ATOMIC_RELAXED);
}

static void on_fault(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = ctx;
    char buf[160];
    int n = snprintf(buf, sizeof buf, "fault %d rip 0x%llx addr %p tid %ld\n", sig,
                     (unsigned long long)uc->uc_mcontext.gregs[REG_RIP], si->si_addr, (long)syscall(SYS_gettid));
    (void)!write(1, buf, n);
    _exit(128 + sig);
}

static void *worker(void *arg) {
    long t = (long)arg, i, w = 0;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (i = 0; !stop; i++) {
        w += check_round(i, t);
        if ((i & 1023) == 1023) {
            __atomic_add_fetch(&iters, 1024, __ATOMIC_RELAXED);
            if (w) { __atomic_add_fetch(&bad, w, __ATOMIC_RELAXED); w = 0; }
        }
    }
    __atomic_add_fetch(&iters, i & 1023, __ATOMIC_RELAXED);
    __atomic_add_fetch(&bad, w, __ATOMIC_RELAXED);
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    struct timespec ts = {0, 2000000};
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (long i = 0; !stop; i++) {
        long w = check_round(i, 77);
        if (w) __atomic_add_fetch(&bad, w, __ATOMIC_RELAXED);
        nanosleep(&ts, NULL); /* EINTR from a stop is fine */
    }
    return NULL;
}

static void *signaller(void *arg) {
    (void)arg;
    pthread_t self = pthread_self();
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (long i = 0; !stop; i++) {
        pthread_kill(self, SIGUSR2);
        if ((i & 63) == 0) pthread_kill(workers[(i >> 6) % WORKERS], SIGUSR2);
        long w = check_round(i, 99);
        if (w) __atomic_add_fetch(&bad, w, __ATOMIC_RELAXED);
    }
    return NULL;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    struct sigaction fa;
    memset(&fa, 0, sizeof fa);
    fa.sa_sigaction = on_fault;
    fa.sa_flags = SA_SIGINFO;
    int faults[] = {SIGSEGV, SIGTRAP, SIGILL, SIGBUS, SIGFPE};
    for (int i = 0; i < 5; i++) sigaction(faults[i], &fa, NULL);
    pthread_t other[2];
    for (long t = 0; t < WORKERS; t++) pthread_create(&workers[t], NULL, worker, (void *)t);
    pthread_create(&other[0], NULL, sleeper, NULL);
    pthread_create(&other[1], NULL, signaller, NULL);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < WORKERS + 2) sched_yield();
    printf("ready %p\n", (void *)f_add);
    fflush(stdout);
    for (;;) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r < 0) continue; /* EINTR */
        if (r == 1 && c == 's') {
            printf("status %ld %ld\n", __atomic_load_n(&iters, __ATOMIC_RELAXED), __atomic_load_n(&bad, __ATOMIC_RELAXED));
            fflush(stdout);
            continue;
        }
        if (r == 1 && c == '\n') continue;
        break;
    }
    stop = 1;
    for (int t = 0; t < WORKERS; t++) pthread_join(workers[t], NULL);
    for (int t = 0; t < 2; t++) pthread_join(other[t], NULL);
    if (bad || iters == 0) {
        printf("bad %ld of %ld (signals handled %ld)\n", bad, iters, handled);
        return 1;
    }
    printf("ok %ld\n", iters);
    return 0;
}
