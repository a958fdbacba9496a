/* The insertion target: N_FUNCS distinct small functions (generated: funcs[] in the header
 * given with -include), a worker thread that calls them all in rounds, and a monitor thread
 * that spins on CLOCK_MONOTONIC and keeps the largest gap it sees between two readings: the
 * longest time the process's threads were held stopped (or descheduled).
 *
 * Commands, one per line on stdin (answers on stdout):
 *   gap        -> "gap MAX_NS": the largest gap since the last "gap", which resets it
 *   run K      -> "ran K": the main thread calls every function K times
 *   worker 0|1 -> "ok": the worker stops calling (and is idle when this answers) or starts again
 *   quit
 *
 * Arguments (optional): DEEP KIB: DEEP more threads each recurse until about KIB KiB of their
 * stack is in use (frames of return addresses, saved registers, and locals that are stack
 * pointers and small numbers, as real stacks hold), then sleep there (the stack scan's cost).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile long max_gap, sink;
static volatile int worker_on = 1, worker_idle;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *monitor(void *arg) {
    (void)arg;
    long prev = now_ns();
    for (;;) {
        long t = now_ns(), d = t - prev;
        prev = t;
        long m = max_gap;
        while (d > m && !__atomic_compare_exchange_n(&max_gap, &m, d, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    }
    return NULL;
}

static void round_all(long x) {
    long s = 0;
    for (int i = 0; i < N_FUNCS; i++) s += funcs[i](x + i);
    sink += s;
}

static void *worker(void *arg) {
    (void)arg;
    struct timespec pause = {0, 200000};
    for (long x = 0;; x++) {
        if (worker_on) {
            worker_idle = 0;
            round_all(x);
        } else {
            worker_idle = 1;
        }
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static long deep_kib;
static volatile int deep_ready;

__attribute__((noinline)) static long descend(char *top, long level) {
    volatile long locals[30];
    for (int i = 0; i < 30; i++) locals[i] = (i & 1) ? (long)&locals[i] : level * 31 + i;
    if (top - (char *)&locals[0] < deep_kib * 1024) return descend(top, level + 1) + locals[level % 30];
    __atomic_fetch_add(&deep_ready, 1, __ATOMIC_RELAXED);
    for (;;) pause();
    return locals[0];
}

static void *deep(void *arg) {
    (void)arg;
    char top;
    return (void *)descend(&top, 0);
}

int main(int argc, char **argv) {
    pthread_t th;
    pthread_create(&th, NULL, monitor, NULL);
    pthread_create(&th, NULL, worker, NULL);
    int n_deep = argc > 2 ? atoi(argv[1]) : 0;
    deep_kib = argc > 2 ? atol(argv[2]) : 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, (size_t)(deep_kib + 256) * 1024);
    for (int i = 0; i < n_deep; i++) pthread_create(&th, &attr, deep, NULL);
    while (deep_ready < n_deep) usleep(1000);
    printf("ready %d %d\n", getpid(), N_FUNCS);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "gap", 3) == 0) {
            printf("gap %ld\n", __atomic_exchange_n(&max_gap, 0, __ATOMIC_RELAXED));
        } else if (strncmp(line, "run ", 4) == 0) {
            long k = atol(line + 4);
            for (long j = 0; j < k; j++) round_all(j);
            printf("ran %ld\n", k);
        } else if (strncmp(line, "worker ", 7) == 0) {
            worker_on = atoi(line + 7);
            while (!worker_on && !worker_idle) usleep(100);
            printf("ok\n");
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
        fflush(stdout);
    }
    return 0;
}
