/* Functions of known duration for latency probes in 32-bit processes (gcc -m32, PIE or not;
   tests/live/test_i386_latency.py).
   usage: latency32 N THREADS FILE
     each thread calls spin_short (spins >= 5 us on CLOCK_MONOTONIC) and spin_long (>= 40 us) N
     times each, tiny() N times, rec(i % 5) N times (1 + i % 5 calls each, nested), wide() N
     times (a 64-bit result in edx:eax); for every spin call it writes to FILE the duration the
     function measured inside itself (a lower bound of what a probe sees) and the duration the
     caller measured around the call (an upper bound): "short|long LO HI" per line.
     Prints "calls=... checksum=..." (the same with or without probes).
   usage: latency32 loop
     prints "ready PID", then calls the functions in 4 threads until stdin closes; prints "done". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long spin(long long ns) {
    long long t0 = now_ns(), t;
    do
        t = now_ns();
    while (t - t0 < ns);
    return t - t0;
}

static volatile int sink;

__attribute__((noinline)) long long spin_short(int x) { return spin(5000) + (x & 0); }
__attribute__((noinline)) long long spin_long(int x) { return spin(40000) + (x & 0); }
/* its entry window ends with its exit: one stub does both */
__attribute__((noinline)) int tiny(int x) { return x + 1; }
/* recursion: each level a call of its own, with its own esp */
__attribute__((noinline)) int rec(int n) {
    if (n <= 0)
        return 0;
    int r = rec(n - 1);
    sink = r;
    return r + 1;
}
/* a 64-bit result in edx:eax */
__attribute__((noinline)) unsigned long long wide(unsigned x) { return ((unsigned long long)x << 32) | (x ^ 0x5a5a5a5au); }

struct arg { int n; long long *lo, *hi; int *kind; long long sum; };

static void *worker(void *p) {
    struct arg *a = p;
    for (int i = 0; i < a->n; i++) {
        for (int k = 0; k < 2; k++) {
            int j = 2 * i + k;
            long long t0 = now_ns();
            long long inside = k ? spin_long(i) : spin_short(i);
            long long t1 = now_ns();
            a->lo[j] = inside;
            a->hi[j] = t1 - t0;
            a->kind[j] = k;
        }
        a->sum += tiny(i) + rec(i % 5) + (long long)(wide(i) >> 32);
    }
    return NULL;
}

static volatile int stop;

static void *looper(void *p) {
    (void)p;
    long long s = 0;
    for (unsigned i = 0; !stop; i++) {
        s += tiny(i) + rec(i % 5) + (long long)(wide(i) >> 32);
        if (i % 64 == 0)
            s += spin_short(i) > 0;
    }
    return (void *)(long)(s & 1);
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "loop")) {
        pthread_t t[4];
        for (int k = 0; k < 4; k++)
            pthread_create(&t[k], NULL, looper, NULL);
        printf("ready %d\n", getpid());
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0)
            ;
        stop = 1;
        for (int k = 0; k < 4; k++)
            pthread_join(t[k], NULL);
        printf("done\n");
        return 0;
    }
    if (argc < 4)
        return 2;
    int n = atoi(argv[1]), threads = atoi(argv[2]);
    if (threads < 1 || threads > 16)
        return 2;
    pthread_t t[16];
    struct arg args[16];
    for (int k = 0; k < threads; k++) {
        args[k].n = n;
        args[k].lo = calloc(2 * n, sizeof(long long));
        args[k].hi = calloc(2 * n, sizeof(long long));
        args[k].kind = calloc(2 * n, sizeof(int));
        args[k].sum = 0;
        pthread_create(&t[k], NULL, worker, &args[k]);
    }
    long long sum = 0;
    FILE *out = fopen(argv[3], "w");
    if (!out)
        return 3;
    for (int k = 0; k < threads; k++) {
        pthread_join(t[k], NULL);
        sum += args[k].sum;
        for (int j = 0; j < 2 * n; j++)
            fprintf(out, "%s %lld %lld\n", args[k].kind[j] ? "long" : "short", args[k].lo[j], args[k].hi[j]);
    }
    fclose(out);
    printf("calls=%d checksum=%lld\n", 4 * n * threads, sum);
    return 0;
}
